"""Sources of frames: a capture file (replay) or the kernel's packet ring (live).

Both yield `(timestamp, linktype, frame)`; `frames.FrameDecoder` turns a frame into a TCP segment.
"""
