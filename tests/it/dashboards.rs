//! The shipped Grafana dashboard (`dist/grafana/acgi-bridge.json`) and Prometheus alert rules
//! (`dist/prometheus/acgi-bridge-rules.yml`): the rules pass `promtool test rules`, every
//! expression parses as PromQL, and every metric, label and label value they select on is in
//! a real bridge's `/metrics`, so that renaming a metric breaks this test, not the dashboard.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use crate::common::{bridge, http_get, ServiceSpec};

fn dist(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("dist")
        .join(path)
}

/// Run promtool with `args`; panics with its output when it fails or is missing.
fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .output()
        .unwrap_or_else(|error| {
            panic!("promtool ({error}): install Debian's prometheus (.ci/test does)")
        });
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}: {report}");
    report
}

/// The `expr:` of every rule in the rules file (single-line or a folded/literal block).
fn rule_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(dist("prometheus/acgi-bridge-rules.yml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let block: Vec<&str> = lines[at + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join(" ").trim().to_string());
        } else {
            exprs.push(value.trim_matches('\'').to_string());
        }
    }
    exprs
}

/// Every query of the dashboard: panel targets and template variables.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(dist("grafana/acgi-bridge.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel {:?} names a fixed datasource",
                panel["title"]
            );
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(SELECTOR, label): the selector is what must exist.
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|rest| rest.rsplit_once(','))
                .map(|(selector, _)| selector)
                .unwrap_or(query);
            exprs.push(inner.to_string());
        }
    }
    exprs
}

/// Grafana's variables replaced by values Prometheus accepts.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$job", ".*")
        .replace("$instance", ".*")
        .replace("$service", ".*")
}

/// A selector in an expression: the metric and its label matchers (label, operator, value).
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// The selectors of an expression: every name that starts like one of the bridge's metrics or
/// `up` (label names and functions never do), with its `{...}` matchers.
fn selectors(expr: &str) -> Vec<Selector> {
    let bytes = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut found = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'"' {
            // A string (a label value outside a selector, or a legend): skip it.
            at += 1 + expr[at + 1..].find('"').map_or(expr.len(), |end| end + 1);
            continue;
        }
        if !ident(bytes[at]) || (at > 0 && ident(bytes[at - 1])) {
            at += 1;
            continue;
        }
        let end = at + expr[at..].bytes().take_while(|c| ident(*c)).count();
        let name = &expr[at..end];
        at = end;
        let is_metric = name.starts_with("acgi_bridge_") || name.starts_with("process_");
        if !(is_metric || name == "up") || expr[end..].starts_with('(') {
            continue;
        }
        let mut matchers = Vec::new();
        if expr[end..].starts_with('{') {
            let close = end + expr[end..].find('}').expect("a closed selector");
            for matcher in split_matchers(&expr[end + 1..close]) {
                matchers.push(matcher);
            }
            at = close + 1;
        }
        found.push(Selector {
            metric: name.to_string(),
            matchers,
        });
    }
    found
}

/// `a="x", b=~"y|z"` into (label, operator, value).
fn split_matchers(body: &str) -> Vec<(String, String, String)> {
    let mut matchers = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let op_at = rest.find(['=', '!']).expect("a matcher operator");
        let label = rest[..op_at].trim().to_string();
        let two = ["=~", "!~", "!="]
            .iter()
            .any(|op| rest[op_at..].starts_with(op));
        let op_len = if two { 2 } else { 1 };
        let op = rest[op_at..op_at + op_len].to_string();
        let after = rest[op_at + op_len..].trim_start();
        let after = after.strip_prefix('"').expect("a quoted matcher value");
        let close = after.find('"').expect("a closed matcher value");
        matchers.push((label, op, after[..close].to_string()));
        rest = after[close + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim();
    }
    matchers
}

/// The samples of an exposition: metric name -> every label set it has (label -> value).
fn samples(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut families: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let mut labels = BTreeMap::new();
        if line[name_end..].starts_with('{') {
            let close = name_end + line[name_end..].rfind('}').expect("closed labels");
            for (label, _, value) in split_matchers(&line[name_end + 1..close]) {
                labels.insert(label, value);
            }
        }
        families
            .entry(line[..name_end].to_string())
            .or_default()
            .push(labels);
    }
    families
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    // Proves the shipped rules are valid (promtool check rules, lint included) and that each
    // alert fires on the series that should trip it, after its `for:`, with its annotations,
    // and not on the neighbour that should not (acgi-bridge-rules.test.yml).
    let rules = dist("prometheus/acgi-bridge-rules.yml");
    let checked = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    let tests = dist("prometheus/acgi-bridge-rules.test.yml");
    let tested = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    // Proves the dashboard's queries are PromQL Prometheus accepts (with Grafana's variables
    // filled in), by handing them to promtool as recording rules.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 30, "only {} queries found", exprs.len());
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, expr) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(&as_promql(expr)).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:query_{index}\n        expr: {quoted}\n"
        ));
    }
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, &rules).unwrap();
    let report = promtool(&["check", "rules", "--lint=none", path.to_str().unwrap()]);
    assert!(report.contains("SUCCESS"), "{report}\n{rules}");
}

#[test]
fn every_metric_label_and_value_the_dashboard_and_rules_use_is_in_the_bridges_metrics() {
    // Proves the dashboard and the rules select only what a real bridge exports: each metric
    // name (histograms by their `_bucket` series), each label matched on, and each value an
    // `=` matcher wants (outcomes, states, exit reasons), found in a scrape of /metrics.
    let bridge = bridge()
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(ServiceSpec::echo())
        .start();
    assert_eq!(
        bridge.client().call("echo", b"scraped").unwrap(),
        b"scraped"
    );
    let (status, text) = http_get(bridge.metrics.as_deref().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let exported = samples(&text);
    // Labels Prometheus adds at scrape time, and the series it makes itself.
    let scrape_labels = ["job", "instance"];
    let mut checked = BTreeSet::new();
    let mut problems = Vec::new();
    for expr in rule_exprs().iter().chain(dashboard_exprs().iter()) {
        for selector in selectors(expr) {
            if selector.metric == "up" {
                continue;
            }
            checked.insert(selector.metric.clone());
            let Some(series) = exported.get(&selector.metric) else {
                problems.push(format!("{} is not exported (in {expr})", selector.metric));
                continue;
            };
            for (label, op, value) in &selector.matchers {
                if scrape_labels.contains(&label.as_str()) {
                    continue;
                }
                if !series.iter().any(|labels| labels.contains_key(label)) {
                    problems.push(format!(
                        "{} has no label {label} (in {expr})",
                        selector.metric
                    ));
                } else if op == "=" && !series.iter().any(|labels| labels.get(label) == Some(value))
                {
                    problems.push(format!(
                        "{} never has {label}=\"{value}\" (in {expr})",
                        selector.metric
                    ));
                }
                // A regex alternation of plain values: each must exist too.
                if op == "=~" || op == "!~" {
                    let plain = |v: &str| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    for alternative in value.split('|').filter(|v| plain(v)) {
                        if !series.iter().any(|labels| {
                            labels.get(label).map(String::as_str) == Some(alternative)
                        }) {
                            problems.push(format!(
                                "{} never has {label}=\"{alternative}\" (in {expr})",
                                selector.metric
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n--- /metrics:\n{text}",
        problems.join("\n")
    );
    // The extraction found what the dashboard is about (not silently nothing).
    for family in [
        "acgi_bridge_requests_total",
        "acgi_bridge_request_duration_seconds_bucket",
        "acgi_bridge_queue_wait_seconds_bucket",
        "acgi_bridge_workers",
        "acgi_bridge_service_max_workers",
        "acgi_bridge_backlog",
        "acgi_bridge_service_backlog_max",
        "acgi_bridge_worker_exits_total",
        "acgi_bridge_connections",
    ] {
        assert!(checked.contains(family), "{family} not among {checked:?}");
    }
}

#[test]
fn the_selector_extraction_sees_names_labels_and_values() {
    // Proves the checker above would catch a rename: it finds metrics, skips functions and
    // label names, and reads each matcher.
    let found = selectors(
        r#"sum by (service) (rate(acgi_bridge_requests_total{service=~"$service", outcome!~"ok|service_error"}[5m])) / max(acgi_bridge_service_max_workers) and up{job="x"}"#,
    );
    let names: Vec<&str> = found.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(
        names,
        [
            "acgi_bridge_requests_total",
            "acgi_bridge_service_max_workers",
            "up"
        ]
    );
    assert_eq!(
        found[0].matchers[1],
        ("outcome".into(), "!~".into(), "ok|service_error".into())
    );
}
