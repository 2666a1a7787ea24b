"""Azure IoT Edge module that scores images with Custom Vision ONNX exports."""
