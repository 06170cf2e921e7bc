"""The on-device contract: graph declarations, their modules and the decoding loop, written once."""
