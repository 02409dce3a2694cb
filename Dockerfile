# syntax=docker/dockerfile:1
#
# The Chappe image: every Chappe binary (chappe, chappe-gateway,
# chappe-fanout, chappe-keydir, chappe-presence, chappe-media,
# chappe-loadtest, chappe-operator) on a minimal Debian, run as a non-root
# user. The Helm chart (charts/chappe) runs the operator from it, the
# operator runs every service and `chappe migrate` from it, and `helm test`
# runs the `chappe` client from it (hence bash, grep and coreutils, which
# debian-slim has and distroless has not).
#
#   docker build -t registry.example.gouv.fr/chappe/chappe:0.1.0 .
#   buildah bud -t registry.example.gouv.fr/chappe/chappe:0.1.0 .
#
# The protobuf API compiles with protox (no protoc); SQLite is bundled; TLS
# is rustls with ring: a C compiler is the only native build dependency.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds
# (BuildKit and buildah both honour them); --locked builds Cargo.lock's
# versions exactly.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin chappe --bin chappe-gateway --bin chappe-fanout --bin chappe-keydir \
        --bin chappe-presence --bin chappe-media --bin chappe-loadtest --bin chappe-operator \
    && mkdir -p /out \
    && cp target/release/chappe target/release/chappe-gateway target/release/chappe-fanout \
        target/release/chappe-keydir target/release/chappe-presence target/release/chappe-media \
        target/release/chappe-loadtest target/release/chappe-operator /out/

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="chappe" \
      org.opencontainers.image.description="Chappe: end-to-end-encrypted messaging services, client and operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="EUPL-1.2"
# CA certificates for OTLP and OIDC over TLS; nothing else is installed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 chappe \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin chappe
COPY --from=build /out/ /usr/local/bin/
# The UID the operator's pods and the chart's pods run as (runAsUser 65532).
USER 65532:65532
WORKDIR /tmp
ENV HOME=/tmp CHAPPE_LOG_FORMAT=json
# gateway gRPC, then the ops ports (/metrics /healthz /readyz) of the
# gateway, fanout, keydir, presence, media and the operator.
EXPOSE 7443 9471 9472 9473 9474 9475 8080
ENTRYPOINT []
CMD ["chappe", "--help"]
