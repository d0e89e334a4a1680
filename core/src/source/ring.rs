//! The kernel's TPACKET_V3 receive ring, mapped from a socket the control plane set up.
