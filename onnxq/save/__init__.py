"""The save stage: checks every output passes and its atomic write."""
