"""Files: model directories, safetensors, nested parameter trees and images."""
