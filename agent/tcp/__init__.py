"""TCP reassembly: segments in, ordered byte streams per connection and direction out."""
