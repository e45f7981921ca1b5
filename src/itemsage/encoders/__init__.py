"""The frozen encoders every stage reads and none trains: all-MiniLM-L6-v2 for text (text.py; its ONNX
Runtime export in onnx_text.py) and EfficientNet-Lite0 for image files (image.py). Both load offline."""
