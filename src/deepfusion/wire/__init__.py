"""Messages on the wire: what crosses between the server and a device, as bytes (docs/WIRE_FORMAT.md)."""
