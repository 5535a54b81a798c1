#if canImport(CoreAI)
import CoreAI
import Foundation
import Tokenizers

/// A phi3-export Core AI bundle folder (`BUNDLE/coreai/`, from `package --target ios --with-coreai`):
/// `model.aimodel` with two functions sharing one KV cache, plus its tokenizer files.
///
/// The contract (BUNDLE/coreai/coreai_config.json): `prefill` takes `inputIds` int32 [1, chunk]
/// (a shorter prompt padded at the end) and `decode` takes [1, 1]; both take `position` int32 [1],
/// the number of tokens the cache already holds, and return `logits` float32 [1, q, vocab]. The
/// states `keyCache`/`valueCache` are the same two arrays for both functions. Needs iOS/macOS 27;
/// on older systems use `Phi3CoreMLModel` (iOS 18 / macOS 15) from the same bundle.
///
/// Written against Apple's published Core AI reference (AIModel, InferenceFunction.run(inputs:states:),
/// NDArray); syntax-checked here, not compiled: there is no iOS 27 SDK on the machine that builds it.
@available(iOS 27.0, macOS 27.0, *)
public final class Phi3CoreAIModel {
    private let prefill: InferenceFunction
    private let decode: InferenceFunction
    private let tokenizer: Tokenizer
    private let stopIds: Set<Int>
    private let chunk: Int
    private let stateShape: [Int]
    private let halfPrecision: Bool
    public let contextLength: Int

    /// `folder`: the bundle's `coreai/` folder (model.aimodel, coreai_config.json, tokenizer.json, ...).
    public init(folder: URL) async throws {
        let model = try await AIModel(contentsOf: folder.appendingPathComponent("model.aimodel"))
        guard let prefill = try model.loadFunction(named: "prefill"), let decode = try model.loadFunction(named: "decode") else {
            throw NSError(domain: "Phi3CoreAIModel", code: 1, userInfo: [NSLocalizedDescriptionKey: "prefill/decode functions missing"])
        }
        self.prefill = prefill
        self.decode = decode
        tokenizer = try await AutoTokenizer.from(modelFolder: folder)
        let contract = try JSONSerialization.jsonObject(with: Data(contentsOf: folder.appendingPathComponent("coreai_config.json"))) as? [String: Any]
        contextLength = contract?["context_length"] as? Int ?? 2048
        let functions = contract?["functions"] as? [String: Any]
        let prefillInputs = (functions?["prefill"] as? [String: Any])?["inputs"] as? [String: Any]
        chunk = ((prefillInputs?["inputIds"] as? [String: Any])?["shape"] as? [Int])?.last ?? 64
        let states = contract?["states"] as? [String: Any]
        stateShape = (states?["keyCache"] as? [String: Any])?["shape"] as? [Int] ?? []
        halfPrecision = (contract?["precision"] as? String ?? "float16") == "float16"
        stopIds = Set(["<|end|>", "<|endoftext|>"].compactMap { tokenizer.convertTokenToId($0) } + [tokenizer.eosTokenId].compactMap { $0 })
    }

    /// Greedy reply to one user message; `onToken` gets each new piece of text and the decode rate.
    public func reply(to prompt: String, maxNewTokens: Int = 256, onToken: (String, Double) -> Void) async throws {
        let scalarType: NDArray.ScalarType = halfPrecision ? .float16 : .float32
        var keyCache = NDArray(shape: stateShape, scalarType: scalarType)
        var valueCache = NDArray(shape: stateShape, scalarType: scalarType)
        var ids = try tokenizer.applyChatTemplate(messages: [["role": "user", "content": prompt]])
        var next = 0
        var position = 0
        // Whole chunks through prefill while one fits in the cache, the rest token by token.
        while ids.count - position > 1, position + chunk <= contextLength {
            let part = Array(ids[position..<min(ids.count, position + chunk)])
            next = try await run(prefill, part + Array(repeating: 0, count: chunk - part.count), at: position,
                                 row: part.count - 1, keyCache: &keyCache, valueCache: &valueCache)
            position += part.count
        }
        while position < ids.count {
            next = try await run(decode, [ids[position]], at: position, row: 0, keyCache: &keyCache, valueCache: &valueCache)
            position += 1
        }
        var generated: [Int] = []
        let start = Date()
        while !stopIds.contains(next), generated.count < maxNewTokens, ids.count < contextLength {
            generated.append(next)
            let rate = Double(generated.count) / max(Date().timeIntervalSince(start), 1e-3)
            onToken(tokenizer.decode(tokens: [next]), rate)
            ids.append(next)
            next = try await run(decode, [next], at: position, row: 0, keyCache: &keyCache, valueCache: &valueCache)
            position += 1
        }
    }

    /// Runs `tokens` at `position`; returns the greedy next token after the token in `row`.
    private func run(_ function: InferenceFunction, _ tokens: [Int], at position: Int, row: Int,
                     keyCache: inout NDArray, valueCache: inout NDArray) async throws -> Int {
        let inputs: [String: NDArray] = [
            "inputIds": NDArray(scalars: tokens.map { Int32($0) }, shape: [1, tokens.count]),
            "position": NDArray(scalars: [Int32(position)], shape: [1]),
        ]
        var states = InferenceFunction.MutableViews()
        states.insert(&keyCache, for: "keyCache")
        states.insert(&valueCache, for: "valueCache")
        let outputs = try await function.run(inputs: inputs, states: states)
        guard let logits = outputs["logits"] else {
            throw NSError(domain: "Phi3CoreAIModel", code: 2, userInfo: [NSLocalizedDescriptionKey: "no logits output"])
        }
        let vocab = logits.shape[2]
        let values: [Float] = logits.scalars(as: Float.self)
        let offset = row * vocab
        var best = 0
        for v in 1..<vocab where values[offset + v] > values[offset + best] {
            best = v
        }
        return best
    }
}
#endif
