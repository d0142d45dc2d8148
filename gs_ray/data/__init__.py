"""Input data: listing files, row schemas, the data stage's read/validate/tokenize/split, and split batches."""
