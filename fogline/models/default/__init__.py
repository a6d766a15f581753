"""The shipped default models (`<name>.tflite`), built by `fogline models build`."""
