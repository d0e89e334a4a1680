//! Where frames come from (capture files, the kernel's ring) and how a frame becomes a TCP segment.

pub mod capture_file;
mod file_bytes;
pub mod frames;
pub mod nginx_reads;
pub mod ring;
pub mod tls;
pub mod tls_probes;
mod trace_events;

#[cfg(feature = "python")]
pub(crate) use file_bytes::os_message;
