"""The built-in end-to-end demo (pipeline.py); `zipvoice.bin.demo` is its command line."""
