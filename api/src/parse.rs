//! Parsing and validation of the port and CIDR lists that pod annotations and
//! `meshlet-init` options carry (`meshlet.io/inbound-ports`, `MESHLET_EXCLUDE_OUTBOUND_CIDRS`,
//! ...). The injector validates annotations and `meshlet-init` validates its options with
//! these same functions, so a value the webhook accepts never fails in the init container.
//!
//! Lists are comma-separated; whitespace around items and empty items (a trailing comma)
//! are ignored. A capture list may instead be `*` (everything).

use std::fmt;

use ipnet::IpNet;

/// An inclusive TCP port range; a single port is a range of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port of the range.
    pub start: u16,
    /// Last port of the range (equal to `start` for a single port).
    pub end: u16,
}

/// Either everything (`*`) or exactly the listed items (possibly none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection<T> {
    /// `*`: every port / every destination.
    All,
    /// Only these items; an empty list selects nothing.
    Only(Vec<T>),
}

/// One bad item in a list, with the reason it was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {item:?}: {reason}")]
pub struct ParseError {
    /// The offending item (trimmed), or the whole value when it is not a list problem.
    pub item: String,
    /// Why it was refused.
    pub reason: Reason,
}

/// Why an item was refused; each message says what a valid value looks like.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// Not a decimal number.
    #[error("port must be a number 1-65535")]
    NotANumber,
    /// A number outside 1-65535.
    #[error("port must be 1-65535")]
    PortOutOfRange,
    /// `a-b` with `a > b`.
    #[error("range start must not be greater than its end (write low-high, e.g. 8000-8100)")]
    RangeReversed,
    /// Neither `addr/prefix` nor a bare address.
    #[error("expected a CIDR such as 10.0.0.0/8 or fd00::/8, or a single IP address")]
    BadCidr,
    /// `*` mixed with other items.
    #[error("`*` selects everything and must be the only item")]
    StarNotAlone,
    /// `*` where only explicit items make sense (exclusion lists).
    #[error("`*` is not allowed here; list the ports or CIDRs explicitly")]
    StarNotAllowed,
}

impl PortRange {
    /// A range holding the single port `p`.
    pub fn single(p: u16) -> Self {
        Self { start: p, end: p }
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

/// Renders as `80` or `8000-8100`, the same syntax the parser accepts.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl<T> Selection<T> {
    /// Whether this selects everything.
    pub fn is_all(&self) -> bool {
        matches!(self, Selection::All)
    }
}

fn err(item: &str, reason: Reason) -> ParseError {
    ParseError {
        item: item.to_string(),
        reason,
    }
}

fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Parses one TCP port, 1-65535.
pub fn parse_port(value: &str) -> Result<u16, ParseError> {
    let item = value.trim();
    if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(item, Reason::NotANumber));
    }
    // Digits only, so the only parse failure left is overflow: out of range.
    match item.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(err(item, Reason::PortOutOfRange)),
    }
}

/// Parses a comma-separated list of ports (`80,443`); `*` is refused.
pub fn parse_port_list(value: &str) -> Result<Vec<u16>, ParseError> {
    items(value)
        .map(|item| {
            if item == "*" {
                return Err(err(item, Reason::StarNotAllowed));
            }
            parse_port(item)
        })
        .collect()
}

/// Parses `*` or a comma-separated list of ports (the inbound capture list).
pub fn parse_port_selection(value: &str) -> Result<Selection<u16>, ParseError> {
    if value.trim() == "*" {
        return Ok(Selection::All);
    }
    if items(value).any(|i| i == "*") {
        return Err(err(value.trim(), Reason::StarNotAlone));
    }
    parse_port_list(value).map(Selection::Only)
}

/// Parses a comma-separated list of ports and ranges (`22,8000-8100`); `*` is refused.
pub fn parse_port_ranges(value: &str) -> Result<Vec<PortRange>, ParseError> {
    items(value)
        .map(|item| {
            if item == "*" {
                return Err(err(item, Reason::StarNotAllowed));
            }
            let Some((lo, hi)) = item.split_once('-') else {
                return parse_port(item).map(PortRange::single);
            };
            // Report the bad half itself, so "80-70000" names "70000".
            let start = parse_port(lo)?;
            let end = parse_port(hi)?;
            if start > end {
                return Err(err(item, Reason::RangeReversed));
            }
            Ok(PortRange { start, end })
        })
        .collect()
}

/// Parses one CIDR; a bare address means that host (`/32` or `/128`). Host bits are
/// cleared (`10.1.2.3/8` becomes `10.0.0.0/8`) because that is what the kernel stores.
pub fn parse_cidr(value: &str) -> Result<IpNet, ParseError> {
    let item = value.trim();
    if let Ok(net) = item.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    item.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| err(item, Reason::BadCidr))
}

/// Parses a comma-separated list of CIDRs; `*` is refused.
pub fn parse_cidr_list(value: &str) -> Result<Vec<IpNet>, ParseError> {
    items(value)
        .map(|item| {
            if item == "*" {
                return Err(err(item, Reason::StarNotAllowed));
            }
            parse_cidr(item)
        })
        .collect()
}

/// Parses `*` or a comma-separated list of CIDRs (the outbound include list).
pub fn parse_cidr_selection(value: &str) -> Result<Selection<IpNet>, ParseError> {
    if value.trim() == "*" {
        return Ok(Selection::All);
    }
    if items(value).any(|i| i == "*") {
        return Err(err(value.trim(), Reason::StarNotAlone));
    }
    parse_cidr_list(value).map(Selection::Only)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_port_list(" 80, 443,").unwrap(), vec![80, 443]);
        assert_eq!(parse_port_list("").unwrap(), Vec::<u16>::new());
        assert_eq!(parse_port("65535").unwrap(), 65535);
        let e = parse_port_list("80,70000").unwrap_err();
        assert_eq!(e.item, "70000");
        assert_eq!(e.reason, Reason::PortOutOfRange);
        assert_eq!(parse_port("0").unwrap_err().reason, Reason::PortOutOfRange);
        assert_eq!(
            parse_port("99999999999999999999").unwrap_err().reason,
            Reason::PortOutOfRange
        );
        assert_eq!(parse_port("http").unwrap_err().reason, Reason::NotANumber);
        assert_eq!(parse_port("-1").unwrap_err().reason, Reason::NotANumber);
        assert_eq!(
            parse_port_list("*").unwrap_err().reason,
            Reason::StarNotAllowed
        );
        assert_eq!(
            e.to_string(),
            "invalid value \"70000\": port must be 1-65535"
        );
    }

    #[test]
    fn selections() {
        assert_eq!(parse_port_selection(" * ").unwrap(), Selection::All);
        assert_eq!(
            parse_port_selection("80,8080").unwrap(),
            Selection::Only(vec![80, 8080])
        );
        assert_eq!(parse_port_selection("").unwrap(), Selection::Only(vec![]));
        assert_eq!(
            parse_port_selection("80,*").unwrap_err().reason,
            Reason::StarNotAlone
        );
        assert_eq!(parse_cidr_selection("*").unwrap(), Selection::All);
        assert_eq!(
            parse_cidr_selection("*,10.0.0.0/8").unwrap_err().reason,
            Reason::StarNotAlone
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_port_ranges("22, 8000-8100").unwrap(),
            vec![
                PortRange::single(22),
                PortRange {
                    start: 8000,
                    end: 8100
                }
            ]
        );
        let e = parse_port_ranges("9000-8000").unwrap_err();
        assert_eq!(
            (e.item.as_str(), e.reason),
            ("9000-8000", Reason::RangeReversed)
        );
        let e = parse_port_ranges("80-70000").unwrap_err();
        assert_eq!(
            (e.item.as_str(), e.reason),
            ("70000", Reason::PortOutOfRange)
        );
        assert_eq!(
            parse_port_ranges("80-").unwrap_err().reason,
            Reason::NotANumber
        );
        assert_eq!(PortRange { start: 1, end: 2 }.to_string(), "1-2");
        assert!(PortRange { start: 1, end: 2 }.contains(2));
    }

    #[test]
    fn cidrs() {
        let v = parse_cidr_list("10.1.2.3/8, 198.18.0.1, fd00::1/64").unwrap();
        let shown: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "198.18.0.1/32", "fd00::/64"]);
        let e = parse_cidr_list("10.0.0.0/33").unwrap_err();
        assert_eq!(
            (e.item.as_str(), e.reason),
            ("10.0.0.0/33", Reason::BadCidr)
        );
        assert_eq!(
            parse_cidr("example.com").unwrap_err().reason,
            Reason::BadCidr
        );
        assert_eq!(
            parse_cidr_list("*").unwrap_err().reason,
            Reason::StarNotAllowed
        );
    }
}
