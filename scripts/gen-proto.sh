#!/usr/bin/env bash
# Generates TypeScript from proto/ (Berth's and REAPI's definitions) and the
# Google protos they import, which come from the google-proto-files package
# and protoc's own include directory.
set -euo pipefail
cd "$(dirname "$0")/.."
out=src/gen
rm -rf "$out" && mkdir -p "$out"
google=node_modules/google-proto-files
protos=$(cd proto && find . -name '*.proto' | sed 's|^\./||' | sort)
protoc \
  --plugin=protoc-gen-ts_proto=node_modules/.bin/protoc-gen-ts_proto \
  --ts_proto_out="$out" \
  --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,forceLong=number,useDate=false,importSuffix=.js,useOptionals=none,exportCommonSymbols=false \
  -I proto -I "$google" \
  $protos google/bytestream/bytestream.proto google/rpc/error_details.proto google/rpc/code.proto
