"""Feed-forward block kinds: one file each, registered in moe/registry.py. blocks/base.py has the
contract every kind keeps."""
