#!/usr/bin/env bash
# Re-creates the vendored Swagger UI under advisor/web/static/swagger/ (served at /docs, no CDN) from the npm
# registry's swagger-ui-dist package at a pinned version; the source-map comments are dropped (no .map files
# are shipped). Run from the repository root; needs npm. Commit the result.
set -euo pipefail
VERSION=5.35.0
out=advisor/web/static/swagger
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "swagger-ui-dist@$VERSION" >/dev/null && tar xzf "swagger-ui-dist-$VERSION.tgz")
mkdir -p "$out"
for f in swagger-ui-bundle.js swagger-ui.css LICENSE NOTICE; do cp "$tmp/package/$f" "$out/$f"; done
sed -i '/sourceMappingURL/d' "$out/swagger-ui-bundle.js" "$out/swagger-ui.css"
echo "swagger-ui-dist $VERSION" > "$out/VERSION"
sha256sum "$out"/swagger-ui-bundle.js "$out"/swagger-ui.css
