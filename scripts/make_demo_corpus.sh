#!/usr/bin/env bash
# Dump the whole King James Bible from Debian's bible-kjv package to data/kjv.txt,
# one verse per line, Genesis 1:1 to Revelation 22:21, references stripped.
# The output is deterministic: it depends only on the packaged text.
#
# Usage: scripts/make_demo_corpus.sh [OUTPUT]   (default: data/kjv.txt, relative to the repo root)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo_root/data/kjv.txt}"
expected_verses=31102   # verses in the KJV (Protestant canon, 66 books)

if ! command -v bible >/dev/null 2>&1; then
    echo "bible not found; installing Debian package bible-kjv" >&2
    sudo_cmd=()
    if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
    "${sudo_cmd[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y --no-install-recommends bible-kjv
fi

mkdir -p "$(dirname "$out")"
tmp="$(mktemp "${out}.XXXXXX")"
trap 'rm -f "$tmp"' EXIT

# -f prints one verse per line as "Ge1:1 In the beginning ..." and never wraps
# (checked with COLUMNS=40); one range spec covers all books in canonical order.
# -m raises the decompression buffer above the 1 MiB default so the whole text
# is served from memory (the output is identical either way).
# sed drops the reference ("Ge1:1 ", "1Sm3:4 ", "Rev22:21 ") and any trailing blanks.
LC_ALL=C COLUMNS=80 bible -f -m 8192 "Gen1:1-Rev22:21" \
    | LC_ALL=C sed -E 's/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ //; s/[[:space:]]+$//' \
    > "$tmp"

verses="$(wc -l < "$tmp")"
if [ "$verses" -ne "$expected_verses" ]; then
    echo "error: got $verses verses from bible, expected $expected_verses" >&2
    exit 1
fi
if LC_ALL=C grep -qE '^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ ' "$tmp"; then
    echo "error: some verse references were not stripped" >&2
    exit 1
fi
mv "$tmp" "$out"
trap - EXIT
echo "wrote $verses verses to $out ($(wc -c < "$out") bytes, sha256 $(sha256sum "$out" | cut -c1-16))"
