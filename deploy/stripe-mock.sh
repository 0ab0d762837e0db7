#!/usr/bin/env bash
# Build stripe-mock (Stripe's own API mock server, a Go module) for the `sync stripe` contract
# tests, and print the binary's path. Idempotent: a binary already built is reused.
#   deploy/stripe-mock.sh [build]     -> prints the path of the stripe-mock binary
# Needs the Go toolchain (go on PATH, or /usr/local/go/bin/go) and the Go module proxy.
set -euo pipefail
VERSION="${STRIPE_MOCK_VERSION:-v0.203.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${STRIPE_MOCK_DIR:-$ROOT/.cache/stripe-mock/$VERSION}"
BIN="$BIN_DIR/stripe-mock"

case "${1:-build}" in
  build)
    if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
    GO="$(command -v go || true)"
    [[ -z "$GO" && -x /usr/local/go/bin/go ]] && GO=/usr/local/go/bin/go
    if [[ -z "$GO" ]]; then echo "stripe-mock.sh: no Go toolchain (go)" >&2; exit 3; fi
    mkdir -p "$BIN_DIR"
    # GOBIN: the binary lands here, not in ~/go/bin; the module cache stays Go's default.
    GOBIN="$BIN_DIR" \
      timeout 900 "$GO" install "github.com/stripe/stripe-mock@$VERSION" >&2
    echo "$BIN"
    ;;
  *) echo "usage: $0 [build]" >&2; exit 2 ;;
esac
