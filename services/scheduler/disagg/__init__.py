"""Prefill/decode disaggregation: a prefill rank computes a prompt's KV and first token, a decode
rank installs that KV and generates the rest (transfer.py moves the KV; prefill_side.py and
decode_side.py are each rank's part; NATS carries only the control messages)."""
