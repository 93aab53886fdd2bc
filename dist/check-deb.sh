#!/usr/bin/env bash
# Build the .deb (cargo-deb) and check that it holds what a systemd installation needs: the
# binary, the units, the packaged config as a conffile, the maintainer scripts that create the
# acgi-bridge user and enable the units, man pages, completions, licenses, and the Grafana
# dashboard and Prometheus alert rules.
#
#   dist/check-deb.sh            build target/release/{acgi-bridge,acgi-echo-worker} and the deb
#   dist/check-deb.sh --no-build package what target/release already holds
#
# Needs cargo-deb (`cargo install cargo-deb`) and dpkg-deb. Prints the .deb's path last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${1:-}" != "--no-build" ]]; then
	# Only what the package ships: the daemon and the demonstration worker (no examples, whose
	# dev-dependencies would more than double the build).
	cargo build --release --locked -p acgi-bridge -p acgi-echo-worker --bins
fi
rm -rf target/dist
cargo run --quiet --locked -p xtask -- dist target/dist >/dev/null
gzip -9n target/dist/man/*.1
deb="$(cargo deb --no-build --locked --strip --output target/debian/ 2>&1 | tail -1)"
[[ -f "$deb" ]] || { echo "cargo deb did not report a package: $deb"; exit 1; }

contents="$(dpkg-deb -c "$deb")"
info="$(dpkg-deb -I "$deb")"
control="$(mktemp -d)"
trap 'rm -rf "$control"' EXIT
dpkg-deb -e "$deb" "$control"

failed=0
need() { # need WHAT TEXT PATTERN: PATTERN (an extended regex) must match a line of TEXT
	if ! grep -Eq -- "$3" <<<"$2"; then
		echo "missing: $1 ($3)"
		failed=1
	fi
}
need "the binary" "$contents" '^-rwxr-xr-x .* \./usr/bin/acgi-bridge$'
need "the echo worker" "$contents" '^-rwxr-xr-x .* \./usr/lib/acgi-bridge/echo$'
need "the service unit" "$contents" ' \./(usr/)?lib/systemd/system/acgi-bridge\.service$'
need "the socket unit" "$contents" ' \./(usr/)?lib/systemd/system/acgi-bridge\.socket$'
need "the config" "$contents" ' \./etc/acgi-bridge/acgi-bridge\.toml$'
for page in acgi-bridge acgi-bridge-serve acgi-bridge-call acgi-bridge-status acgi-bridge-check; do
	need "man page $page" "$contents" " \./usr/share/man/man1/$page\.1\.gz$"
done
need "bash completion" "$contents" ' \./usr/share/bash-completion/completions/acgi-bridge$'
need "zsh completion" "$contents" ' \./usr/share/zsh/vendor-completions/_acgi-bridge$'
need "fish completion" "$contents" ' \./usr/share/fish/vendor_completions\.d/acgi-bridge\.fish$'
need "copyright" "$contents" ' \./usr/share/doc/acgi-bridge/copyright$'
need "LICENSE-MIT" "$contents" ' \./usr/share/doc/acgi-bridge/LICENSE-MIT$'
need "LICENSE-APACHE" "$contents" ' \./usr/share/doc/acgi-bridge/LICENSE-APACHE$'
need "operations guide" "$contents" ' \./usr/share/doc/acgi-bridge/operations\.md$'
need "Grafana dashboard" "$contents" ' \./usr/share/acgi-bridge/grafana/acgi-bridge\.json$'
need "alert rules" "$contents" ' \./usr/share/acgi-bridge/prometheus/acgi-bridge-rules\.yml$'
need "alert rule tests" "$contents" ' \./usr/share/acgi-bridge/prometheus/acgi-bridge-rules\.test\.yml$'
need "package name" "$info" '^ Package: acgi-bridge$'
need "adduser dependency" "$info" '^ Depends: .*adduser'
need "conffile list" "$(cat "$control/conffiles" 2>/dev/null)" '^/etc/acgi-bridge/acgi-bridge\.toml$'
need "postinst creates the user" "$(cat "$control/postinst" 2>/dev/null)" 'adduser --system .*acgi-bridge'
need "postinst enables the units" "$(cat "$control/postinst" 2>/dev/null)" 'deb-systemd-helper .*acgi-bridge\.(service|socket)'
need "postinst upgrades in place" "$(cat "$control/postinst" 2>/dev/null)" '/usr/bin/acgi-bridge upgrade --config'
if grep -q 'deb-systemd-invoke .*restart.*\$_dh_action\|_dh_action=restart' "$control/postinst" 2>/dev/null; then
	echo "postinst restarts the bridge on upgrade (it should hand over with acgi-bridge upgrade)"
	failed=1
fi
need "prerm stops the units" "$(cat "$control/prerm" 2>/dev/null)" 'deb-systemd-invoke stop .*acgi-bridge'
need "postrm purges the state" "$(cat "$control/postrm" 2>/dev/null)" 'rm -rf /var/lib/acgi-bridge'
for script in postinst prerm postrm; do
	if [[ -f "$control/$script" ]] && ! sh -n "$control/$script"; then
		echo "syntax error in $script"
		failed=1
	fi
done
# The packaged config is valid for the packaged binary (with the echo worker where this build
# has it: check wants every exec to exist).
sed "s#/usr/lib/acgi-bridge/echo#$PWD/target/release/acgi-echo-worker#" dist/acgi-bridge.toml \
	>"$control/acgi-bridge.toml"
if ! target/release/acgi-bridge check --config "$control/acgi-bridge.toml" >/dev/null; then
	echo "dist/acgi-bridge.toml does not pass acgi-bridge check"
	failed=1
fi
# The packaged alert rules still pass their own tests where they are installed (the test file
# names the rules file beside it), when promtool is here.
if command -v promtool >/dev/null 2>&1; then
	unpacked="$control/unpacked"
	dpkg-deb -x "$deb" "$unpacked"
	if ! (cd "$unpacked/usr/share/acgi-bridge/prometheus" &&
		promtool test rules acgi-bridge-rules.test.yml >/dev/null); then
		echo "the packaged alert rules fail promtool test rules"
		failed=1
	fi
fi
# The packaged man page of the binary is a man page that names every subcommand.
page="$(gzip -dc target/dist/man/acgi-bridge.1.gz)"
for subcommand in serve call status check; do
	need "man page lists $subcommand" "$page" "acgi\\\\-bridge\\\\-$subcommand"
done

if [[ $failed != 0 ]]; then
	echo "--- dpkg-deb -c $deb"
	echo "$contents"
	echo "--- dpkg-deb -I $deb"
	echo "$info"
	exit 1
fi
echo "deb contents: ok ($(wc -l <<<"$contents") entries, $(du -h "$deb" | cut -f1))"
echo "$deb"
