"""Examples: the image-generation saga, the flaky job service, the mini-app backend."""
