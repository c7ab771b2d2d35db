//! A small YAML emitter for JSON values. serde_yaml writes YAML 1.2, where `on`, `yes`
//! and `0755` are plain strings; kubectl and most Kubernetes tooling read YAML 1.1, where
//! they are a boolean and an octal number. So a ConfigMap value `"on"` that serde_yaml
//! leaves unquoted comes back as `true` and the object is refused. This emitter quotes
//! every string that is not unambiguously a string in both versions.

use serde_json::Value;

/// Renders `v` as a block-style YAML document (no leading `---`).
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => emit_map(&mut out, m, 0, false),
        Value::Array(a) if !a.is_empty() => emit_seq(&mut out, a, 0),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// `inline_first`: the cursor already sits after `- `, so the first key needs no indent.
fn emit_map(out: &mut String, m: &serde_json::Map<String, Value>, n: usize, inline_first: bool) {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !inline_first {
            indent(out, n);
        }
        out.push_str(&string(k));
        out.push(':');
        match v {
            Value::Object(child) if !child.is_empty() => {
                out.push('\n');
                emit_map(out, child, n + 2, false);
            }
            // Sequences under a key sit at the key's indent, as kubectl writes them.
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                emit_seq(out, items, n);
            }
            other => {
                out.push(' ');
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
}

fn emit_seq(out: &mut String, items: &[Value], n: usize) {
    for item in items {
        indent(out, n);
        out.push_str("- ");
        match item {
            Value::Object(m) if !m.is_empty() => emit_map(out, m, n + 2, true),
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                emit_seq(out, a, n + 2);
            }
            other => {
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string(s),
        Value::Object(_) => "{}".to_string(),
        Value::Array(_) => "[]".to_string(),
    }
}

/// YAML 1.1 words that read as booleans or null.
const RESERVED: [&str; 12] = [
    "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "nan", "inf",
];

fn string(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-' | ':' | '@'))
        && !s.ends_with(':')
        && !RESERVED.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        s.to_string()
    } else {
        // A JSON string is a valid YAML double-quoted scalar in both 1.1 and 1.2.
        Value::String(s.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_tricky_values() {
        let v = json!({
            "data": {"a": "on", "b": "yes", "c": "0755", "d": "1:20", "e": "10m", "f": "true",
                     "g": "", "h": "multi\nline", "i": "- x", "j": "a: b", "k": "#c", "l": "x:",
                     "m": "null", "n": "~", "o": "1e3", "p": ".5", "q": "  padded ", "r": "ü"},
            "list": [{"name": "x", "ports": [{"containerPort": 80}]}, [1, 2], [], {}, "plain", 3, 1.5, null, false],
            "empty": {},
            "key with space": "example.com/app:1.0@sha256:ab",
        });
        let text = to_string(&v);
        let back: Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, v, "{text}");
        for quoted in [
            "\"on\"", "\"yes\"", "\"0755\"", "\"1:20\"", "\"true\"", "\"null\"",
        ] {
            assert!(text.contains(quoted), "{quoted} must be quoted:\n{text}");
        }
        assert!(
            text.contains("key with space\": example.com/app:1.0@sha256:ab\n"),
            "{text}"
        );
    }
}
