"""The launcher: starts dpserve's services and creates the tiny model they serve by default."""
