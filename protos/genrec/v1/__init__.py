"""The genrec.v1 gRPC protocol: the .proto sources beside their generated stubs (`make protos` rewrites them)."""
