#!/usr/bin/env bash
# Download Darknet's official YOLOv3 weight files into this folder (or the folder given as $1), and check that
# each has the exact size that models/ expects (header + float32 values, see ../../README.md, "Darknet weights").
#   bash models/weights/download_darknet_weights.sh [OUT_DIR]
# BASE_URL can point at a mirror that serves the same file names.
set -euo pipefail

out_dir="${1:-$(dirname "$0")}"
base_url="${BASE_URL:-https://pjreddie.com/media/files}"
# name and size in bytes (the size the loader computes for 80 classes; a different size is a broken download)
files=(
  "yolov3.weights 248007048"
  "yolov3-tiny.weights 35434956"
  "darknet53.conv.74 162482580"
)

mkdir -p "$out_dir"
for entry in "${files[@]}"; do
  read -r name size <<<"$entry"
  dest="$out_dir/$name"
  if [[ -f "$dest" && "$(stat -c %s "$dest")" == "$size" ]]; then
    echo "$dest: present, $size bytes"
    continue
  fi
  echo "downloading $base_url/$name -> $dest"
  if ! curl --fail --location --retry 3 --output "$dest.part" "$base_url/$name"; then
    rm -f "$dest.part"
    echo "error: could not download $base_url/$name (set BASE_URL to a mirror, or download it by hand into $out_dir)" >&2
    exit 1
  fi
  got="$(stat -c %s "$dest.part")"
  if [[ "$got" != "$size" ]]; then
    rm -f "$dest.part"
    echo "error: $base_url/$name is $got bytes, expected $size: not the official file (or a truncated download)" >&2
    exit 1
  fi
  mv "$dest.part" "$dest"
  echo "$dest: $size bytes"
done
