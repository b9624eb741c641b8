"""Generated gRPC code for the rwkv_serve protos (scripts/gen_protos.py); do not edit."""
