//! TCP reassembly: segments in, ordered stream events per connection and direction out.

pub mod reassembly;
