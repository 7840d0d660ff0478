# syntax=docker/dockerfile:1
# A `php -S` app with zdt as the container's PID 1. Build from the repository
# root (the context needs Cargo.toml, src/ and the app):
#
#   docker build -f contrib/kubernetes/Dockerfile.php -t zdt-php .
#
# Dockerfile.php.dockerignore keeps target/ and .git out of the context.

# --- zdt and zdtctl, built from this repository ---------------------------
# Debian bookworm's glibc is older than the runtime image's, so the binaries
# run there.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml names the integration test target; nothing of it is built.
COPY tests ./tests
RUN cargo build --release --locked --bin zdt --bin zdtctl

# --- the runtime -----------------------------------------------------------
FROM php:8-cli
COPY --from=build /src/target/release/zdt /src/target/release/zdtctl /usr/local/bin/
COPY contrib/php/app.php /app/app.php
COPY contrib/kubernetes/supervisor.php.toml /app/supervisor.toml
# zdt checks that its log folder is root's and not writable by others.
RUN mkdir -p /var/log/zdt && chmod 0755 /var/log/zdt
# `kubectl exec POD -- zdtctl status` finds the config, hence the control
# socket, through this.
ENV ZDT_CONFIG=/app/supervisor.toml
# 8080: the app (zdt's proxy); 9180: zdt's admin listener (/health,
# /metrics, /status).
EXPOSE 8080 9180
# What the kubelet and `docker stop` send: zdt turns /health to 503, serves
# on for drain_delay, drains requests in flight, stops the app, exits 0.
STOPSIGNAL SIGTERM
# zdt is PID 1 itself; no tini or dumb-init in front of it. It does what
# those do: one SIGCHLD-driven reaper collects every child with
# waitpid(-1), orphans of the app included (a double-forked helper, a
# php -S worker whose parent died); it installs handlers for TERM, INT and
# HUP, so the kernel's rule that PID 1 ignores signals it does not handle
# does not apply; and a second TERM or INT means exit now.
ENTRYPOINT ["zdt", "-c", "/app/supervisor.toml"]
# The base image's CMD ("php -a") must not become zdt's arguments.
CMD []
