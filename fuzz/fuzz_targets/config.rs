//! The config loader on any text: an error or a config, never a panic, and
//! an error's position inside the text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // zdt reads the file as UTF-8 first; other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match zdt::fuzz::parse_config(text, Path::new("/etc/zdt/supervisor.toml")) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(e) => {
            let lines = text.split('\n').count();
            assert!(e.line <= lines, "error on line {} of {lines}", e.line);
            assert!(!e.message.is_empty());
            let _ = e.render();
        }
    }
});
