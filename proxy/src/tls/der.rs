//! The few certificate fields the mesh reads that webpki does not expose: the URI SANs
//! (SPIFFE ids), the key usage bits and NotAfter.
//!
//! A deliberately small DER walker instead of a full X.509 parser: on the handshake
//! path it only ever sees certificates webpki has already parsed and chain-validated,
//! and at load time our own certificate. Anything it does not understand is `None`.

/// What the mesh reads from a certificate.
#[derive(Debug, PartialEq, Eq)]
pub struct CertInfo<'a> {
    /// NotAfter, as unix seconds.
    pub not_after: u64,
    /// URI subject alternative names.
    pub uris: Vec<&'a str>,
    /// The key usage extension's first byte (bit 0x80 is digitalSignature), if present.
    pub key_usage: Option<u8>,
}

const SEQUENCE: u8 = 0x30;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const BIT_STRING: u8 = 0x03;
const VERSION: u8 = 0xa0;
const EXTENSIONS: u8 = 0xa3;
const URI_NAME: u8 = 0x86;
/// id-ce-subjectAltName, 2.5.29.17.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// id-ce-keyUsage, 2.5.29.15.
const OID_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];

/// One TLV: tag, contents, and what follows it.
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The contents of a TLV that must have `tag`.
fn expect(buf: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, v, rest) = tlv(buf)?;
    (t == tag).then_some((v, rest))
}

/// Parses the fields the mesh needs from a DER certificate.
pub fn parse(cert: &[u8]) -> Option<CertInfo<'_>> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = tlv(rest)?.2;
    }
    // serialNumber, signature, issuer
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (validity, after_validity) = expect(rest, SEQUENCE)?;
    let (_, not_before_rest) = tlv(validity).map(|(_, v, r)| (v, r))?;
    let (tag, not_after, _) = tlv(not_before_rest)?;
    let not_after = time(tag, not_after)?;
    // subject, subjectPublicKeyInfo
    rest = tlv(after_validity)?.2;
    rest = tlv(rest)?.2;
    let mut info = CertInfo {
        not_after,
        uris: Vec::new(),
        key_usage: None,
    };
    // Optional issuerUniqueID [1], subjectUniqueID [2], then extensions [3].
    while let Some((tag, value, next)) = tlv(rest) {
        rest = next;
        if tag != EXTENSIONS {
            continue;
        }
        let (mut exts, _) = expect(value, SEQUENCE)?;
        while !exts.is_empty() {
            let (ext, next) = expect(exts, SEQUENCE)?;
            exts = next;
            let (oid, mut body) = expect(ext, OID)?;
            if body.first() == Some(&BOOLEAN) {
                body = tlv(body)?.2;
            }
            let (value, _) = expect(body, OCTET_STRING)?;
            if oid == OID_SAN {
                let (mut names, _) = expect(value, SEQUENCE)?;
                while !names.is_empty() {
                    let (tag, name, next) = tlv(names)?;
                    names = next;
                    if tag == URI_NAME {
                        info.uris.push(std::str::from_utf8(name).ok()?);
                    }
                }
            } else if oid == OID_KEY_USAGE {
                let (bits, _) = expect(value, BIT_STRING)?;
                info.key_usage = Some(bits.get(1).copied().unwrap_or(0));
            }
        }
    }
    Some(info)
}

/// UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime `YYYYMMDDHHMMSSZ` as unix seconds.
fn time(tag: u8, v: &[u8]) -> Option<u64> {
    let digits = |s: &[u8]| -> Option<u64> {
        s.iter().try_fold(0u64, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
        })
    };
    let (year, rest) = match tag {
        UTC_TIME if v.len() == 13 => {
            let yy = digits(&v[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &v[2..])
        }
        GENERALIZED_TIME if v.len() == 15 => (digits(&v[..4])?, &v[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let (h, m, s) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    Some(days * 86400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> Option<u64> {
    let y = if m <= 2 { y.checked_sub(1)? } else { y };
    let era = y / 400;
    let yoe = y % 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146097 + doe).checked_sub(719468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(time(UTC_TIME, b"000301000000Z"), Some(951868800));
        assert_eq!(time(UTC_TIME, b"491231235959Z"), Some(2524607999));
        assert_eq!(time(GENERALIZED_TIME, b"20500101000000Z"), Some(2524608000));
        assert_eq!(time(GENERALIZED_TIME, b"20240229120000Z"), Some(1709208000));
        assert_eq!(time(UTC_TIME, b"7001010000Z"), None);
        assert_eq!(time(UTC_TIME, b"701301000000Z"), None);
        assert_eq!(time(UTC_TIME, b"70010100000aZ"), None);
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(&[0x30, 0x82, 0xff]), None);
        assert_eq!(parse(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }

    #[test]
    fn reads_rcgen_certificates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["web.example".to_string()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        ));
        p.not_after = rcgen::date_time_ymd(2049, 12, 31);
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        let info = parse(cert.der()).unwrap();
        assert_eq!(info.uris, vec!["spiffe://cluster.local/ns/a/sa/b"]);
        assert_eq!(info.not_after, 2524521600);
        assert_eq!(info.key_usage, Some(0x80));

        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyEncipherment];
        p.subject_alt_names.truncate(1);
        p.not_after = rcgen::date_time_ymd(2051, 1, 1);
        let cert = p.self_signed(&key).unwrap();
        let info = parse(cert.der()).unwrap();
        assert!(info.uris.is_empty());
        assert_eq!(info.key_usage, Some(0x20));
        assert_eq!(info.not_after, 2556144000);
    }
}
