"""Weight loading for the elastic model: lazy safetensors slices so each rank reads only its own share."""
