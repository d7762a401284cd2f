"""The DP controller: picks a data-parallel rank for every tokenized request."""
