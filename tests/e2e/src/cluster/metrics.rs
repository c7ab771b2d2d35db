//! Prometheus text exposition, parsed enough to sum counters by label.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket`, ... suffixes as exposed).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// All samples, in page order.
    pub samples: Vec<Sample>,
}

/// Parses a page; lines that do not parse are skipped.
pub fn parse(text: &str) -> Metrics {
    Metrics {
        samples: text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect(),
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut end = None;
        loop {
            // Skip separators, then read key="value".
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut val = String::new();
            let mut esc = false;
            for (_, c) in chars.by_ref() {
                match (esc, c) {
                    (true, 'n') => {
                        val.push('\n');
                        esc = false;
                    }
                    (true, c) => {
                        val.push(c);
                        esc = false;
                    }
                    (false, '\\') => esc = true,
                    (false, '"') => break,
                    (false, c) => val.push(c),
                }
            }
            labels.insert(key.trim().to_string(), val);
        }
        rest = &r[end? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

impl Metrics {
    /// Sum of `name` over samples whose labels include every `(key, value)` of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter)
            .fold(0.0, |acc, s| acc + s.value)
    }

    /// Samples of `name` whose labels include every pair of `filter`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

/// Renders a sample as one exposition line, for reports.
pub fn show(s: &Sample) -> String {
    let labels: Vec<String> = s
        .labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect();
    format!("{}{{{}}} {}", s.name, labels.join(","), s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sums() {
        let m = parse(
            "# HELP meshlet_requests_total Requests.\n\
             # TYPE meshlet_requests_total counter\n\
             meshlet_requests_total{direction=\"inbound\",service=\"backend\",status_code=\"200\"} 3\n\
             meshlet_requests_total{direction=\"inbound\",service=\"backend\",status_code=\"503\"} 1\n\
             meshlet_requests_total{direction=\"outbound\",service=\"a \\\"q\\\", b\",status_code=\"200\"} 2 1700000000\n\
             process_resident_memory_bytes 4096\n\
             bucket{le=\"+Inf\"} +Inf\n",
        );
        assert_eq!(m.samples.len(), 5);
        assert_eq!(
            m.sum("meshlet_requests_total", &[("direction", "inbound")]),
            4.0
        );
        assert_eq!(
            m.sum("meshlet_requests_total", &[("service", "a \"q\", b")]),
            2.0
        );
        assert_eq!(m.sum("process_resident_memory_bytes", &[]), 4096.0);
        assert!(m.has("bucket") && !m.has("nope"));
    }
}
