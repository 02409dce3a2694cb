//! chappe-loadtest: how many messages per second a Chappe deployment takes,
//! at what latency, with how many connected devices, and where it breaks,
//! measured with real end-to-end-encrypted clients.
//!
//! - [`config`]: every setting of a run (`chappe-loadtest run --help`);
//! - [`engine`]: one worker's run: devices, conversations, the open, closed
//!   and step load models, delivery accounting;
//! - [`raw`]: the light wire-level device of the pre-encrypted mode;
//! - [`measure`]: HdrHistogram recorders and the live progress line;
//! - [`report`]: the JSON report, and exact merging of workers' reports;
//! - [`html`], [`compare`]: the HTML report and side-by-side comparison;
//! - [`scrape`]: the server's own `/metrics`, before and after a run;
//! - [`nats_bench`]: raw NATS rates between two processes next to the same
//!   operations through the bus layer (`chappe-loadtest nats`);
//! - [`media_bench`]: upload and download MiB/s of one file through a
//!   gateway, and the RSS of the processes on its way (`chappe-loadtest
//!   media`);
//! - [`presence_bench`]: presence updates/s over NATS next to raw
//!   request/reply (`chappe-loadtest presence`);
//! - [`cli`]: the command line, the embedded platform and worker processes.

pub mod cli;
pub mod compare;
pub mod config;
pub mod engine;
pub mod html;
pub mod measure;
pub mod media_bench;
pub mod nats_bench;
pub mod output;
pub mod presence_bench;
pub mod raw;
pub mod report;
pub mod scrape;
pub mod store_bench;
