"""The rwkv-serve wire contract: `rwkv_serve.v1`, the gRPC code generated from protos/ (scripts/gen_protos.py; do
not edit), and `rwkv_serve.contract`, what the SDK and the server share beyond the protos. Installed by the
rwkv-serve-client distribution (client/), which the server depends on."""
