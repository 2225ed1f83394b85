#!/usr/bin/env bash
# Regenerate protocol/proto/ingest_pb2*.py from ingest.proto (needs grpcio-tools:
# pip install -e '.[dev]'). The generated files are committed; run this after editing the .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protocol/proto/ingest.proto
echo "regenerated: $(ls protocol/proto/ingest_pb2*.py* | tr '\n' ' ')"
