#!/bin/sh
# Make a Debian bookworm base image from Debian's own packages, for hosts that cannot pull
# python:3.11-slim from a registry (air-gapped, a registry-less CI). Needs root, debootstrap and
# podman (or docker). Prints the tag; `make image` passes it as BASE_IMAGE.
#
#   deploy/docker/base-image.sh [TAG]        (default: course-base:bookworm)
set -eu
TAG=${1:-course-base:bookworm}
ENGINE=${ENGINE:-podman}
if $ENGINE image exists "$TAG" 2>/dev/null || $ENGINE image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG"; exit 0
fi
ROOT=$(mktemp -d /tmp/course-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
# minbase + Python 3.11 with venv (Debian's python3 is "externally managed", PEP 668: we use a venv)
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$ROOT" >&2
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | $ENGINE import - "$TAG" >&2
echo "$TAG"
