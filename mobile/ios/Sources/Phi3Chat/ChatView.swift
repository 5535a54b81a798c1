import SwiftUI

/// One prompt, one streamed reply, tokens/sec: the smallest useful chat screen.
///
/// Expects the bundle's `coreml/` folder at Documents/phi3-bundle/coreml (copy it there, or
/// download it at first launch and run `phi3-export verify` on it in your CI first).
@available(iOS 18.0, macOS 15.0, *)
public struct ChatView: View {
    @State private var prompt = "What does the for statement do in Python?"
    @State private var reply = ""
    @State private var status = "not loaded"
    @State private var model: Phi3CoreMLModel?

    public init() {}

    private var folder: URL {
        URL.documentsDirectory.appendingPathComponent("phi3-bundle/coreml")
    }

    public var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            TextField("Prompt", text: $prompt)
            Button("Generate") { Task { await generate() } }
            Text(status).font(.caption)
            ScrollView { Text(reply).frame(maxWidth: .infinity, alignment: .leading) }
        }
        .padding()
    }

    private func generate() async {
        do {
            if model == nil {
                status = "loading (first launch compiles the model)"
                model = try await Phi3CoreMLModel(folder: folder)
            }
            reply = ""
            try await model?.reply(to: prompt) { piece, rate in
                reply += piece
                status = String(format: "%.1f tokens/s", rate)
            }
        } catch {
            status = "error: \(error.localizedDescription)"
        }
    }
}
