//! The platform's own ports, kept from the kernel's automatic assignment.
//!
//! A socket that listens without binding first gets a free port of
//! `ip_local_port_range`, and Landlock, which holds an app's binds to its
//! own port, does not see that `listen`. The shims' listen guard refuses
//! it (`nx_runtime::listen`), but not on a kernel without seccomp user
//! notifications, and a process of the host may do the same: one that held
//! every other port of that range would be handed the database's port
//! (54320 by default, inside Linux's default range) the moment PostgreSQL
//! restarted, and then the database's connections and passwords. The
//! kernel never assigns a port of `ip_local_reserved_ports`
//! so: at its start the receiver adds its ports that lie in the range (the
//! database's, its listeners', the apps' range where it overlaps), keeping
//! what the host reserved already. Reservations stay until the host reboots
//! or an operator removes them; a port outside the range needs none.

use std::io;
use std::ops::RangeInclusive;
use std::path::Path;

/// Reserves the parts of `wanted` that lie in the automatic range, in the
/// host's `/proc/sys/net/ipv4` at `sys` (a temporary directory in tests);
/// returns the ranges it added, none when all were reserved already.
pub fn reserve(sys: &Path, wanted: &[RangeInclusive<u16>]) -> io::Result<Vec<RangeInclusive<u16>>> {
    let auto = std::fs::read_to_string(sys.join("ip_local_port_range"))?;
    let mut bounds = auto.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else {
        return Err(io::Error::other(format!("ip_local_port_range reads {auto:?}")));
    };
    let path = sys.join("ip_local_reserved_ports");
    // The file is the host's, and every receiver on it (the test suite runs
    // dozens at once) reads, adds and writes it: under one lock, or one's
    // write drops what another added meanwhile. Taken on the file itself,
    // which any of them opens.
    let locked = nx_runtime::sys::lock(std::fs::File::open(&path)?)?;
    let held = parse(&read_at_once(&locked)?)?;
    let added: Vec<RangeInclusive<u16>> = wanted
        .iter()
        .filter_map(|r| {
            let (start, end) = ((*r.start()).max(low), (*r.end()).min(high));
            (start <= end).then_some(start..=end)
        })
        .filter(|r| !r.clone().all(|p| held.iter().any(|h| h.contains(&p))))
        .collect();
    if !added.is_empty() {
        let all: Vec<RangeInclusive<u16>> = held.into_iter().chain(added.iter().cloned()).collect();
        std::fs::write(&path, format(&merge(all)))?;
    }
    Ok(added)
}

/// The whole of a sysctl file in one `read`: the kernel formats the list
/// anew at each read, so one read in pieces (as `read_to_string`'s first
/// small read makes it) joins two versions when another process writes in
/// between, and a list of ports read so ("45,33257,...") would be written
/// back wrong.
pub fn read_at_once(mut file: &std::fs::File) -> io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; 64 << 10];
    let n = file.read(&mut buf)?;
    if n == buf.len() {
        return Err(io::Error::other("ip_local_reserved_ports is longer than 64 KiB"));
    }
    buf.truncate(n);
    String::from_utf8(buf).map_err(io::Error::other)
}

/// `8080,9000-9010` as ranges.
fn parse(text: &str) -> io::Result<Vec<RangeInclusive<u16>>> {
    let bad = || io::Error::other(format!("ip_local_reserved_ports reads {text:?}"));
    text.trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('-') {
            Some((a, b)) => Ok(a.parse().map_err(|_| bad())?..=b.parse().map_err(|_| bad())?),
            None => s.parse().map(|p| p..=p).map_err(|_| bad()),
        })
        .collect()
}

/// Sorted, with touching and overlapping ranges joined.
fn merge(mut ranges: Vec<RangeInclusive<u16>>) -> Vec<RangeInclusive<u16>> {
    ranges.sort_by_key(|r| *r.start());
    let mut merged: Vec<RangeInclusive<u16>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(*r.start()) <= u32::from(*last.end()) + 1 => {
                *last = *last.start()..=(*last.end()).max(*r.end());
            }
            _ => merged.push(r),
        }
    }
    merged
}

fn format(ranges: &[RangeInclusive<u16>]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| if r.start() == r.end() { r.start().to_string() } else { format!("{}-{}", r.start(), r.end()) })
        .collect();
    format!("{}\n", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(reserved: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ip_local_port_range"), "32768\t60999\n").unwrap();
        std::fs::write(dir.path().join("ip_local_reserved_ports"), reserved).unwrap();
        dir
    }

    fn reserved(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("ip_local_reserved_ports")).unwrap()
    }

    #[test]
    fn ports_in_the_automatic_range_are_added_to_what_the_host_reserved() {
        let dir = host("40000,50000-50010\n");
        let added = reserve(dir.path(), &[54320..=54320, 8080..=8080, 20000..=29999, 60990..=61010]).unwrap();
        assert_eq!(added, [54320..=54320, 60990..=60999]);
        assert_eq!(reserved(&dir), "40000,50000-50010,54320,60990-60999\n");
        // Again: all reserved already, nothing written.
        assert!(reserve(dir.path(), &[54320..=54320]).unwrap().is_empty());
        assert!(reserve(dir.path(), &[50005..=50005]).unwrap().is_empty());
    }

    #[test]
    fn receivers_reserving_at_once_all_keep_their_ports() {
        let dir = host("\n");
        std::thread::scope(|s| {
            for i in 0..32u16 {
                let path = dir.path();
                s.spawn(move || reserve(path, &[40000 + 2 * i..=40000 + 2 * i]).unwrap());
            }
        });
        let kept = parse(&reserved(&dir)).unwrap();
        let missing: Vec<u16> =
            (0..32u16).map(|i| 40000 + 2 * i).filter(|p| !kept.iter().any(|r| r.contains(p))).collect();
        assert!(missing.is_empty(), "a reservation made at the same time dropped {missing:?}");
    }

    #[test]
    fn touching_ranges_are_joined_and_an_empty_list_is_read() {
        let dir = host("\n");
        reserve(dir.path(), &[40001..=40005, 40000..=40000, 40006..=40010]).unwrap();
        assert_eq!(reserved(&dir), "40000-40010\n");
    }

    #[test]
    fn a_file_that_does_not_parse_is_an_error_and_left_alone() {
        let dir = host("40000,x\n");
        let e = reserve(dir.path(), &[54320..=54320]).unwrap_err();
        assert!(e.to_string().contains("ip_local_reserved_ports reads"), "{e}");
        assert_eq!(reserved(&dir), "40000,x\n");
    }
}
