#!/usr/bin/env bash
# Download COCO 2017 (train + val images, instance annotations) and unpack it in the layout args.yaml expects:
#   <out>/images/{train2017,val2017}/*.jpg   <out>/annotations/instances_{train,val}2017.json
#   bash datasets/get_coco.sh [OUT_DIR]            (default data/coco; about 19 GB downloaded, 20 GB unpacked)
# BASE_URL can point at a mirror with the same zips/ and annotations/ paths. Downloads resume when re-run.
set -euo pipefail

out_dir="${1:-data/coco}"
base_url="${BASE_URL:-http://images.cocodataset.org}"
for tool in curl unzip; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed (e.g. apt-get install $tool)" >&2; exit 1; }
done

mkdir -p "$out_dir/images" "$out_dir/downloads"
fetch() {  # fetch URL_PATH: download into downloads/, resuming a partial file; fail loudly
  local name; name="$(basename "$1")"
  echo "downloading $base_url/$1"
  if ! curl --fail --location --retry 3 --continue-at - --output "$out_dir/downloads/$name" "$base_url/$1"; then
    echo "error: could not download $base_url/$1 (set BASE_URL to a mirror, or put $name in $out_dir/downloads/)" >&2
    exit 1
  fi
}

fetch annotations/annotations_trainval2017.zip
unzip -q -o "$out_dir/downloads/annotations_trainval2017.zip" 'annotations/instances_*2017.json' -d "$out_dir"
for split in val2017 train2017; do
  fetch "zips/$split.zip"
  unzip -q -o "$out_dir/downloads/$split.zip" -d "$out_dir/images"
done

for f in images/train2017 images/val2017 annotations/instances_train2017.json annotations/instances_val2017.json; do
  [[ -e "$out_dir/$f" ]] || { echo "error: $out_dir/$f is missing after unpacking" >&2; exit 1; }
done
echo "COCO 2017 is in $out_dir ($(ls "$out_dir/images/train2017" | wc -l) train, $(ls "$out_dir/images/val2017" | wc -l) val images)."
echo "The zips in $out_dir/downloads can be deleted."
