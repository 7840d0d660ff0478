use super::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use tar::EntryType;

/// One archive entry, described for both builders.
enum E<'a> {
    File(&'a str, &'a str, u32),
    Dir(&'a str),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Fifo(&'a str),
}

/// Writes name and link name bytes straight into the header: the builder's
/// own setters refuse `..` and absolute names, which these tests need.
fn raw(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &str,
    ty: EntryType,
    link: &str,
    data: &[u8],
    mode: u32,
) {
    let mut header = tar::Header::new_gnu();
    let old = header.as_old_mut();
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_entry_type(ty);
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    tar.append(&header, data).expect("append");
}

fn tar_bytes(entries: &[E<'_>]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for entry in entries {
        match *entry {
            E::File(name, data, mode) => raw(
                &mut tar,
                name,
                EntryType::Regular,
                "",
                data.as_bytes(),
                mode,
            ),
            E::Dir(name) => raw(&mut tar, name, EntryType::Directory, "", b"", 0o755),
            E::Link(name, to) => raw(&mut tar, name, EntryType::Symlink, to, b"", 0o777),
            E::Hard(name, to) => raw(&mut tar, name, EntryType::Link, to, b"", 0o644),
            E::Fifo(name) => raw(&mut tar, name, EntryType::Fifo, "", b"", 0o644),
        }
    }
    tar.into_inner().expect("finish tar")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}

fn zip_bytes(entries: &[E<'_>]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for entry in entries {
        match *entry {
            E::File(name, data, mode) => {
                zip.start_file(name, options.unix_permissions(mode))
                    .expect("file");
                zip.write_all(data.as_bytes()).expect("write");
            }
            E::Dir(name) => zip.add_directory(name, options).expect("dir"),
            E::Link(name, to) => zip.add_symlink(name, to, options).expect("symlink"),
            E::Hard(..) | E::Fifo(_) => unreachable!("zip has none"),
        }
    }
    zip.finish().expect("finish zip").into_inner()
}

fn archive(kind: ArchiveKind, entries: &[E<'_>]) -> Vec<u8> {
    match kind {
        ArchiveKind::Tar => tar_bytes(entries),
        ArchiveKind::TarGz => gzip(&tar_bytes(entries)),
        ArchiveKind::Zip => zip_bytes(entries),
    }
}

/// `root/dest` (the release), `root/sentinel` (must stay empty), and the
/// archive at `root/archive`.
struct Layout {
    root: tempfile::TempDir,
}

impl Layout {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir(root.path().join("dest")).expect("mkdir");
        fs::create_dir(root.path().join("sentinel")).expect("mkdir");
        Layout { root }
    }
    fn dest(&self) -> PathBuf {
        self.root.path().join("dest")
    }
    fn sentinel(&self) -> String {
        self.root.path().join("sentinel").display().to_string()
    }
    fn unpack(&self, kind: ArchiveKind, bytes: &[u8]) -> Result<Filled, FetchError> {
        let archive = self.root.path().join("archive");
        fs::write(&archive, bytes).expect("write archive");
        unpack(&archive, kind, &self.dest())
    }
    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.dest().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }
    fn mode(&self, rel: &str) -> u32 {
        fs::symlink_metadata(self.dest().join(rel))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }
    /// Nothing written anywhere: the release folder, the sentinel and the
    /// root hold what they held before.
    fn assert_untouched(&self) {
        let names = |p: &Path| -> Vec<String> {
            let mut v: Vec<_> = fs::read_dir(p)
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(self.root.path()), ["archive", "dest", "sentinel"]);
        assert!(
            names(&self.dest()).is_empty(),
            "written: {:?}",
            names(&self.dest())
        );
        assert!(names(Path::new(&self.sentinel())).is_empty());
    }
}

#[test]
fn tar_and_tar_gz_round_trip() {
    for kind in [ArchiveKind::Tar, ArchiveKind::TarGz] {
        let layout = Layout::new();
        let filled = layout
            .unpack(
                kind,
                &archive(
                    kind,
                    &[
                        E::Dir("bin/"),
                        E::File("bin/run", "#!/bin/sh\n", 0o755),
                        E::File("app.js", "hello", 0o664),
                        E::File("setuid", "s", 0o4755),
                        E::Link("start", "bin/run"),
                        E::Hard("same", "app.js"),
                        E::Fifo("pipe"),
                    ],
                ),
            )
            .expect("unpack");
        assert_eq!(
            filled,
            Filled {
                bytes: 16,
                entries: 6,
                skipped: 1
            },
            "{kind}"
        );
        assert_eq!(layout.read("bin/run"), "#!/bin/sh\n");
        assert_eq!(layout.read("same"), "hello");
        assert_eq!(layout.mode("bin/run"), 0o755);
        assert_eq!(layout.mode("app.js"), 0o644, "group write dropped");
        assert_eq!(layout.mode("setuid"), 0o755, "setuid dropped");
        assert_eq!(
            fs::read_link(layout.dest().join("start")).expect("link"),
            Path::new("bin/run")
        );
        let ino = |rel: &str| fs::metadata(layout.dest().join(rel)).expect("stat").ino();
        assert_eq!(ino("same"), ino("app.js"), "hard link");
        assert_eq!(
            fs::metadata(layout.dest().join("app.js"))
                .expect("stat")
                .mtime(),
            1_700_000_000
        );
        assert!(!layout.dest().join("pipe").exists());
    }
}

#[test]
fn zip_round_trip() {
    let layout = Layout::new();
    let entries = [
        E::Dir("bin"),
        E::File("bin/run", "#!/bin/sh\n", 0o755),
        E::File("app.js", "hello", 0o644),
        E::Link("start", "bin/run"),
    ];
    let filled = layout
        .unpack(ArchiveKind::Zip, &zip_bytes(&entries))
        .expect("unpack");
    assert_eq!(
        filled,
        Filled {
            bytes: 15,
            entries: 4,
            skipped: 0
        }
    );
    assert_eq!(layout.read("bin/run"), "#!/bin/sh\n");
    assert_eq!(layout.read("app.js"), "hello");
    assert_eq!(
        (
            layout.mode("bin/run"),
            layout.mode("app.js"),
            layout.mode("bin")
        ),
        (0o755, 0o644, 0o755)
    );
    assert_eq!(
        fs::read_link(layout.dest().join("start")).expect("link"),
        Path::new("bin/run")
    );
}

#[test]
fn one_top_folder_is_stripped_a_mixed_top_is_kept() {
    for kind in [ArchiveKind::Tar, ArchiveKind::TarGz, ArchiveKind::Zip] {
        let layout = Layout::new();
        let entries = [
            E::Dir("app-1.2/"),
            E::File("app-1.2/index.php", "<?php", 0o644),
            E::File("app-1.2/src/a.php", "a", 0o644),
        ];
        layout
            .unpack(kind, &archive(kind, &entries))
            .expect("unpack");
        assert_eq!(layout.read("index.php"), "<?php", "{kind}");
        assert_eq!(layout.read("src/a.php"), "a", "{kind}");

        let layout = Layout::new();
        let entries = [
            E::File("app/index.php", "<?php", 0o644),
            E::File("README", "r", 0o644),
        ];
        layout
            .unpack(kind, &archive(kind, &entries))
            .expect("unpack");
        assert_eq!(layout.read("app/index.php"), "<?php", "{kind}");
        assert_eq!(layout.read("README"), "r", "{kind}");
    }
}

/// Unpacks `entries` and expects the whole archive refused, naming
/// `entry`, with nothing written anywhere.
fn assert_refused(kind: ArchiveKind, entries: &[E<'_>], entry: &str, problem: &str) {
    let layout = Layout::new();
    let sentinel = layout.sentinel();
    let entries: Vec<E<'_>> = entries
        .iter()
        .map(|e| {
            let fix =
                |s: &str| -> &str { Box::leak(s.replace("SENTINEL", &sentinel).into_boxed_str()) };
            match *e {
                E::File(n, d, m) => E::File(fix(n), d, m),
                E::Dir(n) => E::Dir(fix(n)),
                E::Link(n, t) => E::Link(fix(n), fix(t)),
                E::Hard(n, t) => E::Hard(fix(n), fix(t)),
                E::Fifo(n) => E::Fifo(fix(n)),
            }
        })
        .collect();
    let e = layout
        .unpack(kind, &archive(kind, &entries))
        .expect_err("refused");
    let text = e.to_string();
    let (entry, problem) = (
        entry.replace("SENTINEL", &sentinel),
        problem.replace("SENTINEL", &sentinel),
    );
    assert!(matches!(e, FetchError::Unsafe { .. }), "{kind}: {text}");
    assert!(
        text.contains(&format!("entry {entry:?} {problem}")),
        "{kind}: {text}"
    );
    layout.assert_untouched();
}

#[test]
fn malicious_archives_are_refused_whole() {
    let file = |name| E::File(name, "evil", 0o755);
    let cases: Vec<(Vec<E<'_>>, &str, &str)> = vec![
        (
            vec![file("ok"), file("../sentinel/evil")],
            "../sentinel/evil",
            "has a '..' component",
        ),
        (
            vec![file("ok"), file("SENTINEL/evil")],
            "SENTINEL/evil",
            "is an absolute path",
        ),
        (
            vec![file("a/../../sentinel/evil")],
            "a/../../sentinel/evil",
            "has a '..' component",
        ),
        (
            vec![E::Link("l", "../../outside")],
            "l",
            "is a symlink to \"../../outside\", which resolves outside",
        ),
        (
            vec![E::Link("l", "SENTINEL"), file("l/evil")],
            "l",
            "is a symlink to \"SENTINEL\", an absolute path",
        ),
        (
            vec![E::Link("l", "/etc"), file("l/passwd")],
            "l",
            "is a symlink to \"/etc\", an absolute path",
        ),
        (
            vec![E::Dir("sub/"), E::Link("l", "sub"), file("l/x")],
            "l/x",
            "goes through \"l\", a symlink",
        ),
        (
            vec![E::Dir("d/"), E::Link("d/up", ".."), E::Link("l", "d/up/..")],
            "l",
            "is a symlink to \"d/up/..\", which resolves outside",
        ),
    ];
    for kind in [ArchiveKind::Tar, ArchiveKind::TarGz, ArchiveKind::Zip] {
        for (entries, entry, problem) in &cases {
            assert_refused(kind, entries, entry, problem);
        }
    }
    let tar_only: Vec<(Vec<E<'_>>, &str, &str)> = vec![
        (
            vec![E::Hard("h", "../sentinel/f")],
            "h",
            "is a hard link to \"../sentinel/f\", which has a '..' component",
        ),
        (
            vec![E::Hard("h", "/etc/passwd")],
            "h",
            "is a hard link to \"/etc/passwd\", which is an absolute path",
        ),
        (
            vec![E::Hard("h", "f"), file("f")],
            "h",
            "is a hard link to \"f\", which is not a file earlier",
        ),
    ];
    for (entries, entry, problem) in &tar_only {
        assert_refused(ArchiveKind::Tar, entries, entry, problem);
    }
}

#[test]
fn misnamed_and_corrupt_archives_name_the_file() {
    let layout = Layout::new();
    let e = layout
        .unpack(ArchiveKind::TarGz, b"just some text\n")
        .expect_err("text")
        .to_string();
    assert!(e.ends_with("archive is named like a gzip-compressed tar archive, but it holds text: \"just some text\\n\""), "{e}");
    let e = layout
        .unpack(ArchiveKind::Zip, &tar_bytes(&[E::Dir("a/")]))
        .expect_err("tar")
        .to_string();
    assert!(
        e.ends_with("is named like a zip archive, but its content is a tar archive"),
        "{e}"
    );

    let whole = gzip(&tar_bytes(&[
        E::File("a", &"x".repeat(100_000), 0o644),
        E::File("b", "b", 0o644),
    ]));
    let e = layout
        .unpack(ArchiveKind::TarGz, &whole[..whole.len() / 2])
        .expect_err("truncated");
    let text = e.to_string();
    assert!(
        text.starts_with("cannot read archive ") && text.contains("archive:"),
        "{text}"
    );
    layout.assert_untouched();
}

#[test]
fn long_names_are_refused() {
    let layout = Layout::new();
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_entry_type(EntryType::Regular);
    // The builder writes a GNU long-name entry for this one.
    let name = format!("{}/f", "d".repeat(5000));
    tar.append_data(&mut header, &name, io::empty())
        .expect("append");
    let e = layout
        .unpack(ArchiveKind::Tar, &tar.into_inner().expect("tar"))
        .expect_err("long");
    assert!(
        e.to_string()
            .contains("has a name of 5002 bytes (at most 4096 allowed)"),
        "{e}"
    );
    layout.assert_untouched();
}
