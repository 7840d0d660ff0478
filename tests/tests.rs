//! Integration tests: the real zdt, zdtctl and demo worker, real processes,
//! real sockets and signals. One binary (ripgrep's layout).

mod util;

mod admin;
mod bench_tools;
mod canary;
mod config;
mod control;
mod crashes;
mod deploy;
mod deploy_sources;
mod faults;
mod import;
mod lifecycle;
mod logs;
mod multihost;
mod pass;
mod pause;
mod pid1;
mod proxy;
mod proxy_process;
mod reload;
mod security;
mod spawning;
mod systemd;
mod upgrade;
mod zdtctl;
