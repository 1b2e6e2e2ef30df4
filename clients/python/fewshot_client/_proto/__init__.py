"""Generated gRPC stubs of protos/fewshot/v1/fewshot.proto (scripts/gen-protos.sh)."""
