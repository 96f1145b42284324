//! What a drain holds when the receiver stops, kept for the next start. A
//! receiver restarted or upgraded while a drain is down or slow would
//! otherwise lose every record the drain's queue held. At a graceful stop
//! each drain's waiting records are written to `<data>/drains/<id>.ndjson`
//! (0600 in a 0700 directory: they are the tenants' output), read back into
//! the drain's queue when it starts again, and removed; files no drain
//! claims at the first start are removed. A receiver killed outright keeps
//! nothing (the queue lives in memory), and a record shipped just before
//! the stop whose delivery was not confirmed yet is shipped again: drains
//! get records at least once across a restart.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Record;

/// Why a drain's records could not be kept or read back.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot keep the records of drain {id} in {path}: {source}")]
    Write { id: String, path: PathBuf, source: std::io::Error },
    #[error("cannot read the records kept for drain {id} from {path}: {source}")]
    Read { id: String, path: PathBuf, source: std::io::Error },
    #[error("{id:?} is not a drain id")]
    BadId { id: String },
}

/// A drain's file in `dir`; ids are the receiver's own, checked anyway so
/// that none can name a path outside `dir`.
fn file(dir: &Path, id: &str) -> Result<PathBuf, SpoolError> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(SpoolError::BadId { id: id.to_owned() });
    }
    Ok(dir.join(format!("{id}.ndjson")))
}

/// Writes the newest of `records` (given oldest first) that fit in
/// `max_bytes` as serialised (JSON escaping can make a record several times
/// its weight) as drain `id`'s file, replacing any: whole or not at all (a
/// temporary file renamed into place). Returns how many were kept.
pub fn save(dir: &Path, id: &str, records: &[Arc<Record>], max_bytes: usize) -> Result<usize, SpoolError> {
    let path = file(dir, id)?;
    let failed = |source| SpoolError::Write { id: id.to_owned(), path: path.clone(), source };
    let mut lines = Vec::new();
    let mut size = 0;
    for record in records.iter().rev() {
        let mut line = serde_json::to_vec(record.as_ref()).map_err(|e| failed(e.into()))?;
        line.push(b'\n');
        if size + line.len() > max_bytes {
            break;
        }
        size += line.len();
        lines.push(line);
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(failed)?;
    let partial = dir.join(format!(".{id}.ndjson.partial"));
    let mut out = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(failed)?,
    );
    for line in lines.iter().rev() {
        out.write_all(line).map_err(failed)?;
    }
    out.into_inner().map_err(|e| failed(e.into_error()))?.sync_all().map_err(failed)?;
    std::fs::rename(&partial, &path).map_err(failed)?;
    Ok(lines.len())
}

/// Takes drain `id`'s records back (oldest first) and removes its file; no
/// file is no records. Reads at most `max_bytes` of it (what [`save`] was
/// given, so a file that grew past it cannot fill memory); a line that is
/// not a record is skipped and counted in the second value.
pub fn take(dir: &Path, id: &str, max_bytes: usize) -> Result<(Vec<Record>, usize), SpoolError> {
    let path = file(dir, id)?;
    let failed = |source| SpoolError::Read { id: id.to_owned(), path: path.clone(), source };
    let opened = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(failed(e)),
    };
    let (mut records, mut skipped) = (Vec::new(), 0);
    let reader = std::io::BufReader::new(std::io::Read::take(opened, max_bytes as u64));
    for line in reader.lines() {
        match serde_json::from_str::<Record>(&line.map_err(failed)?) {
            Ok(record) => records.push(record),
            Err(_) => skipped += 1,
        }
    }
    std::fs::remove_file(&path).map_err(failed)?;
    Ok((records, skipped))
}

/// Removes the files of drains not in `keep` (removed while no receiver
/// ran, or whose URL is no longer allowed) and partial ones; returns how
/// many.
pub fn sweep(dir: &Path, keep: &HashSet<&str>) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let claimed = name.strip_suffix(".ndjson").is_some_and(|id| keep.contains(id));
        if !claimed && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::super::Source;
    use super::*;

    fn record(n: usize, source: Source) -> Arc<Record> {
        Arc::new(Record {
            at: chrono::DateTime::from_timestamp(1_700_000_000 + n as i64, 0).unwrap_or_default(),
            app: Some("web".into()),
            deployment: (source != Source::Event).then(|| "abcd1234".into()),
            source,
            message: format!("line {n} with \"quotes\" and\nnewline"),
            fields: (source == Source::Access).then(|| serde_json::json!({ "path": "/x", "status": 200 })),
        })
    }

    #[test]
    fn kept_records_come_back_in_order_once_and_readable_by_the_receiver_alone() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("drains");
        let records = vec![record(0, Source::App), record(1, Source::Access), record(2, Source::Event)];
        assert_eq!(save(&spool, "dr_1", &records, 1 << 20).unwrap(), 3);
        let path = spool.join("dr_1.ndjson");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777, 0o700);
        let (back, skipped) = take(&spool, "dr_1", 1 << 20).unwrap();
        assert_eq!((back, skipped), (records.iter().map(|r| r.as_ref().clone()).collect(), 0));
        assert!(!path.exists(), "taken once");
        assert_eq!(take(&spool, "dr_1", 1 << 20).unwrap(), (Vec::new(), 0));
    }

    #[test]
    fn reading_back_stops_at_the_bound_and_skips_what_is_not_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<_> = (0..100).map(|n| record(n, Source::App)).collect();
        save(dir.path(), "dr_2", &records, 1 << 20).unwrap();
        let path = dir.path().join("dr_2.ndjson");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("not a record\n{text}")).unwrap();
        let first_two = "not a record\n".len() + text.lines().take(2).map(|l| l.len() + 1).sum::<usize>();
        let (back, skipped) = take(dir.path(), "dr_2", first_two).unwrap();
        assert_eq!(skipped, 1);
        assert_eq!(back, [records[0].as_ref().clone(), records[1].as_ref().clone()]);
    }

    #[test]
    fn only_the_newest_records_that_fit_the_bound_as_written_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<_> = (0..100).map(|n| record(n, Source::App)).collect();
        let line = serde_json::to_vec(records[99].as_ref()).unwrap().len() + 1;
        assert_eq!(save(dir.path(), "dr_3", &records, 3 * line + 1).unwrap(), 3);
        let (back, _) = take(dir.path(), "dr_3", 3 * line + 1).unwrap();
        let messages: Vec<_> = back.iter().map(|r| r.message.clone()).collect();
        assert_eq!(messages, [97, 98, 99].map(|n| records[n].message.clone()));
    }

    #[test]
    fn ids_cannot_name_other_paths_and_unclaimed_files_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        for id in ["../x", "a/b", "", "dr.1"] {
            assert!(matches!(save(dir.path(), id, &[], 1 << 20), Err(SpoolError::BadId { .. })), "{id}");
        }
        save(dir.path(), "dr_keep", &[record(0, Source::App)], 1 << 20).unwrap();
        save(dir.path(), "dr_gone", &[record(0, Source::App)], 1 << 20).unwrap();
        std::fs::write(dir.path().join(".dr_keep.ndjson.partial"), "half").unwrap();
        assert_eq!(sweep(dir.path(), &HashSet::from(["dr_keep"])), 2);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["dr_keep.ndjson"]);
    }
}
