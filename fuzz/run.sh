#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 15), one after the other, on nightly with
# cargo-fuzz (`cargo install --locked cargo-fuzz`; .ci/run installs it when missing).
#
#   fuzz/run.sh            # about 15 s a target: what CI runs
#   fuzz/run.sh 600        # the long run recorded in fuzz/README.md
#
# Each target starts from its corpus (fuzz/corpus/TARGET, kept between runs, not committed)
# and the seeds committed in fuzz/seeds/TARGET. A crash fails the run and names the input
# libFuzzer wrote (fuzz/artifacts/TARGET/crash-...); once fixed, copy that file into
# fuzz/regressions/TARGET/, named for what it broke, where the stable tests replay it.
# Prints one line a target: its runs (execs), and its corpus size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
seconds="${1:-15}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
	echo "fuzzing needs the nightly toolchain: rustup toolchain install nightly" >&2
	exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzzing needs cargo-fuzz: cargo install --locked cargo-fuzz" >&2
	exit 1
fi

cargo +nightly fuzz build
mkdir -p target/logs
for target in $(cargo +nightly fuzz list); do
	mkdir -p "corpus/$target" "seeds/$target"
	log="target/logs/$target.log"
	if ! cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
		-max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
		tail -n 40 "$log"
		echo "fuzz target $target failed (its whole log: fuzz/$log)" >&2
		grep -o 'artifacts/[^ ]*' "$log" | sort -u | sed 's|^|  the input: fuzz/|' >&2 || true
		exit 1
	fi
	runs="$(grep -o '^stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
	files="$(find "corpus/$target" -type f | wc -l)"
	bytes="$(du -sb "corpus/$target" | cut -f1)"
	echo "fuzz $target: ${seconds} s, $runs runs, corpus $files inputs ($bytes bytes): ok"
done
