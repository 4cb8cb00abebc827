"""Real services the tests start themselves, on free loopback ports, in temp dirs."""
