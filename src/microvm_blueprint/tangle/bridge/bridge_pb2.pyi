# Generated from ../shared/tangle/blueprint-manager/bridge.proto by python -m microvm_blueprint.tangle.bridge.build
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PortRequest(_message.Message):
    __slots__ = ("preferred_port",)
    PREFERRED_PORT_FIELD_NUMBER: _ClassVar[int]
    preferred_port: int
    def __init__(self, preferred_port: _Optional[int] = ...) -> None: ...

class PortResponse(_message.Message):
    __slots__ = ("port",)
    PORT_FIELD_NUMBER: _ClassVar[int]
    port: int
    def __init__(self, port: _Optional[int] = ...) -> None: ...

class ServiceOwner(_message.Message):
    __slots__ = ("key_type", "key_bytes")
    class KeyType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[ServiceOwner.KeyType]
        ECDSA: _ClassVar[ServiceOwner.KeyType]
        SR25519: _ClassVar[ServiceOwner.KeyType]
    UNKNOWN: ServiceOwner.KeyType
    ECDSA: ServiceOwner.KeyType
    SR25519: ServiceOwner.KeyType
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_BYTES_FIELD_NUMBER: _ClassVar[int]
    key_type: ServiceOwner.KeyType
    key_bytes: bytes
    def __init__(self, key_type: _Optional[_Union[ServiceOwner.KeyType, str]] = ..., key_bytes: _Optional[bytes] = ...) -> None: ...

class RegisterBlueprintServiceProxyRequest(_message.Message):
    __slots__ = ("service_id", "api_key_prefix", "upstream_url", "owners", "tls_profile")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_URL_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    TLS_PROFILE_FIELD_NUMBER: _ClassVar[int]
    service_id: int
    api_key_prefix: str
    upstream_url: str
    owners: _containers.RepeatedCompositeFieldContainer[ServiceOwner]
    tls_profile: TlsProfileConfig
    def __init__(self, service_id: _Optional[int] = ..., api_key_prefix: _Optional[str] = ..., upstream_url: _Optional[str] = ..., owners: _Optional[_Iterable[_Union[ServiceOwner, _Mapping]]] = ..., tls_profile: _Optional[_Union[TlsProfileConfig, _Mapping]] = ...) -> None: ...

class UnregisterBlueprintServiceProxyRequest(_message.Message):
    __slots__ = ("service_id",)
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    service_id: int
    def __init__(self, service_id: _Optional[int] = ...) -> None: ...

class AddOwnerToServiceRequest(_message.Message):
    __slots__ = ("service_id", "owner_to_add")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_TO_ADD_FIELD_NUMBER: _ClassVar[int]
    service_id: int
    owner_to_add: ServiceOwner
    def __init__(self, service_id: _Optional[int] = ..., owner_to_add: _Optional[_Union[ServiceOwner, _Mapping]] = ...) -> None: ...

class RemoveOwnerFromServiceRequest(_message.Message):
    __slots__ = ("service_id", "owner_to_remove")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_TO_REMOVE_FIELD_NUMBER: _ClassVar[int]
    service_id: int
    owner_to_remove: ServiceOwner
    def __init__(self, service_id: _Optional[int] = ..., owner_to_remove: _Optional[_Union[ServiceOwner, _Mapping]] = ...) -> None: ...

class UpdateBlueprintServiceTlsProfileRequest(_message.Message):
    __slots__ = ("service_id", "tls_profile")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TLS_PROFILE_FIELD_NUMBER: _ClassVar[int]
    service_id: int
    tls_profile: TlsProfileConfig
    def __init__(self, service_id: _Optional[int] = ..., tls_profile: _Optional[_Union[TlsProfileConfig, _Mapping]] = ...) -> None: ...

class TlsProfileConfig(_message.Message):
    __slots__ = ("tls_enabled", "require_client_mtls", "encrypted_server_cert", "encrypted_server_key", "encrypted_client_ca_bundle", "encrypted_upstream_ca_bundle", "encrypted_upstream_client_cert", "encrypted_upstream_client_key", "client_cert_ttl_hours", "sni", "subject_alt_name_template", "allowed_dns_names")
    TLS_ENABLED_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_CLIENT_MTLS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_SERVER_CERT_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_SERVER_KEY_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_CLIENT_CA_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_UPSTREAM_CA_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_UPSTREAM_CLIENT_CERT_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_UPSTREAM_CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_TTL_HOURS_FIELD_NUMBER: _ClassVar[int]
    SNI_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ALT_NAME_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    tls_enabled: bool
    require_client_mtls: bool
    encrypted_server_cert: bytes
    encrypted_server_key: bytes
    encrypted_client_ca_bundle: bytes
    encrypted_upstream_ca_bundle: bytes
    encrypted_upstream_client_cert: bytes
    encrypted_upstream_client_key: bytes
    client_cert_ttl_hours: int
    sni: str
    subject_alt_name_template: str
    allowed_dns_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tls_enabled: _Optional[bool] = ..., require_client_mtls: _Optional[bool] = ..., encrypted_server_cert: _Optional[bytes] = ..., encrypted_server_key: _Optional[bytes] = ..., encrypted_client_ca_bundle: _Optional[bytes] = ..., encrypted_upstream_ca_bundle: _Optional[bytes] = ..., encrypted_upstream_client_cert: _Optional[bytes] = ..., encrypted_upstream_client_key: _Optional[bytes] = ..., client_cert_ttl_hours: _Optional[int] = ..., sni: _Optional[str] = ..., subject_alt_name_template: _Optional[str] = ..., allowed_dns_names: _Optional[_Iterable[str]] = ...) -> None: ...
