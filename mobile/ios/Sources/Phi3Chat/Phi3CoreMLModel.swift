import CoreML
import Foundation
import Tokenizers

/// A phi3-export Core ML bundle (`BUNDLE/coreml/`): a stateful ML program plus its tokenizer files.
///
/// The program's contract (BUNDLE/coreml/coreml_config.json): `inputIds` int32 [1, q],
/// `causalMask` fp16 [1, 1, q, past + q] (the program reads `past` from its last dimension and
/// masks causally itself, so zeros are enough), states `keyCache`/`valueCache`, output
/// `logits` fp32 [1, q, vocab]. Needs iOS 18 / macOS 15.
@available(iOS 18.0, macOS 15.0, *)
public final class Phi3CoreMLModel {
    private let model: MLModel
    private let tokenizer: Tokenizer
    private let stopIds: Set<Int>
    public let contextLength: Int

    /// `folder`: the bundle's `coreml/` folder (model.mlpackage, config.json, tokenizer.json, ...).
    public init(folder: URL, computeUnits: MLComputeUnits = .cpuAndGPU) async throws {
        // Xcode compiles a .mlpackage added to the app target; a downloaded bundle is compiled here, once.
        let compiled = try await MLModel.compileModel(at: folder.appendingPathComponent("model.mlpackage"))
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits
        model = try MLModel(contentsOf: compiled, configuration: configuration)
        tokenizer = try await AutoTokenizer.from(modelFolder: folder)
        let contract = try JSONSerialization.jsonObject(with: Data(contentsOf: folder.appendingPathComponent("coreml_config.json"))) as? [String: Any]
        contextLength = contract?["context_length"] as? Int ?? 2048
        stopIds = Set(["<|end|>", "<|endoftext|>"].compactMap { tokenizer.convertTokenToId($0) } + [tokenizer.eosTokenId].compactMap { $0 })
    }

    /// Greedy reply to one user message; `onToken` gets each new piece of text and the decode rate.
    public func reply(to prompt: String, maxNewTokens: Int = 256, onToken: (String, Double) -> Void) async throws {
        var ids = try tokenizer.applyChatTemplate(messages: [["role": "user", "content": prompt]])
        let state = model.makeState()
        var next = try await step(ids, past: 0, state: state)
        var generated: [Int] = []
        let start = Date()
        while !stopIds.contains(next), generated.count < maxNewTokens, ids.count < contextLength {
            generated.append(next)
            let rate = Double(generated.count) / max(Date().timeIntervalSince(start), 1e-3)
            onToken(tokenizer.decode(tokens: [next]), rate)
            let past = ids.count
            ids.append(next)
            next = try await step([next], past: past, state: state)
        }
    }

    /// Runs `tokens` after `past` cached positions; returns the greedy next token.
    private func step(_ tokens: [Int], past: Int, state: MLState) async throws -> Int {
        let q = tokens.count
        let inputIds = try MLMultiArray(shape: [1, NSNumber(value: q)], dataType: .int32)
        for (i, t) in tokens.enumerated() { inputIds[[0, NSNumber(value: i)]] = NSNumber(value: t) }
        let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: q), NSNumber(value: past + q)], dataType: .float16)
        mask.withUnsafeMutableBytes { bytes, _ in bytes.initializeMemory(as: UInt8.self, repeating: 0) }
        let inputs = try MLDictionaryFeatureProvider(dictionary: ["inputIds": inputIds, "causalMask": mask])
        let output = try await model.prediction(from: inputs, using: state)
        guard let logits = output.featureValue(for: "logits")?.multiArrayValue else {
            throw NSError(domain: "Phi3CoreMLModel", code: 1, userInfo: [NSLocalizedDescriptionKey: "no logits output"])
        }
        let vocab = logits.shape[2].intValue
        let row = (q - 1) * vocab
        var best = 0
        var bestValue = -Float.infinity
        logits.withUnsafeBufferPointer(ofType: Float.self) { values in
            for v in 0..<vocab where values[row + v] > bestValue {
                bestValue = values[row + v]
                best = v
            }
        }
        return best
    }
}
