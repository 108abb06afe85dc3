"""Readers and writers of the file formats of the field: structures, particle metadata, image stacks, maps."""
