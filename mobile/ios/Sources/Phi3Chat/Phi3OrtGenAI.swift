// The same reply through onnxruntime-genai's Objective-C API, from a bundle made with
// `phi3-export package --target ios --with-onnx` (its `onnx/` folder).
//
// Compiled only with the ORT_GENAI flag: add the onnxruntime-genai Objective-C pod (or framework)
// to the app, import `ort_genai_objc.h` in the bridging header, and set
// `OTHER_SWIFT_FLAGS = -D ORT_GENAI`.
#if ORT_GENAI
import Foundation

public final class Phi3OrtGenAI {
    private let model: OGAModel
    private let tokenizer: OGATokenizer

    /// `folder`: the bundle's `onnx/` folder (genai_config.json, model.onnx, model.onnx.data, tokenizer files).
    public init(folder: URL) throws {
        model = try OGAModel(path: folder.path)
        tokenizer = try OGATokenizer(model: model)
    }

    public func reply(to prompt: String, maxLength: Int = 512, onToken: (String, Double) -> Void) throws {
        let sequences = try tokenizer.encode("<|user|>\n\(prompt)<|end|>\n<|assistant|>\n")
        let params = try OGAGeneratorParams(model: model)
        try params.setSearchOption("max_length", doubleValue: Double(maxLength))
        let generator = try OGAGenerator(model: model, params: params)
        try generator.appendTokenSequences(sequences)
        let stream = try OGATokenizerStream(tokenizer: tokenizer)
        let start = Date()
        var count = 0
        while try !generator.isDone() {
            try generator.generateNextToken()
            let length = generator.sequenceCount(at: 0, error: nil)
            let data = try generator.sequenceData(at: 0)
            count += 1
            onToken(try stream.decode(data[length - 1]), Double(count) / max(Date().timeIntervalSince(start), 1e-3))
        }
    }
}
#endif
