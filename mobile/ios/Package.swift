// swift-tools-version:5.10
// A SwiftUI chat view over a phi3-export ios bundle. Add this package to an iOS 18 / macOS 15
// app target (File > Add Package Dependencies > Add Local...), then show `ChatView`.
import PackageDescription

let package = Package(
    name: "Phi3Chat",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [.library(name: "Phi3Chat", targets: ["Phi3Chat"])],
    dependencies: [
        // Tokenizers (tokenizer.json + chat template), offline from the bundle folder.
        .package(url: "https://github.com/huggingface/swift-transformers", from: "0.1.17"),
    ],
    targets: [
        .target(name: "Phi3Chat", dependencies: [.product(name: "Transformers", package: "swift-transformers")]),
    ]
)
